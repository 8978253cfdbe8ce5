"""Progress bars with an ETA for steps that take more than a few seconds (loading a large model, recording,
synthesizing or replaying a routing trace, training).

A bar is drawn on stderr only when stderr is a terminal, and never with `quiet` or inside `silenced()` (what
the commands' --quiet sets), so logs, pipes and tests see nothing. tqdm does the rates and the ETA.

    >>> with bar(total=len(layers), desc="replay", unit="layer") as b:
    ...     for layer in layers:
    ...         work(layer); b.update()
    >>> for prompt in track(prompts, "record", "prompt"):
    ...     run(prompt)
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")
_SILENT: ContextVar[bool] = ContextVar("hybrid_progress_silent", default=False)


def bar(total: int, desc: str | None = None, unit: str = "it", quiet: bool = False, initial: int = 0):
    """A tqdm bar over `total` units (a disabled one, which costs nothing, when quiet, silenced or not a
    terminal). Use it as a context manager, or close() it."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=_off(quiet))


def track(items: Sequence[T], desc: str, unit: str = "it") -> Iterable[T]:
    """`items`, drawing a bar as they are consumed (under the same conditions as bar())."""
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit=unit, dynamic_ncols=True, disable=_off(False))


def _off(quiet: bool) -> bool:
    return quiet or _SILENT.get() or not sys.stderr.isatty()


@contextmanager
def silenced(on: bool = True) -> Iterator[None]:
    """No bar is drawn inside this block when `on` (a command's --quiet around everything it runs)."""
    token = _SILENT.set(on)
    try:
        yield
    finally:
        _SILENT.reset(token)
