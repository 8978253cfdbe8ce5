"""The one error type for reading model files: it says which file, which tensor, what is wrong, and
what to do about it, so a user with a 1 TB download never has to read a safetensors traceback."""
from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    """A model folder, shard or tensor that cannot be used as it is.

    Args:
        problem: what is wrong, in words (values included).
        file: the file concerned, if any; it starts the message.
        tensor: the tensor concerned, if any.
        fix: what the user should do; appended as "Fix: ...".

    The parts are kept as attributes (`file`, `tensor`, `problem`, `fix`) for callers that want them.

    Example:
        >>> str(CheckpointError("is 10 bytes, expected 20", file="m.safetensors", fix="re-download it"))
        'm.safetensors: is 10 bytes, expected 20. Fix: re-download it'
    """

    def __init__(self, problem: str, *, file: str | Path | None = None, tensor: str | None = None,
                 fix: str | None = None):
        self.problem, self.fix, self.tensor = problem, fix, tensor
        self.file = None if file is None else Path(file)
        where = ": ".join(p for p in (None if file is None else str(file),
                                      None if tensor is None else f"tensor '{tensor}'") if p)
        msg = f"{where}: {problem}" if where else problem
        stop = "" if msg.endswith((".", "?", "!")) else "."
        super().__init__(f"{msg}{stop} Fix: {fix}" if fix else msg)
