"""Errors that cross layers (raised in the runtime, reported by the CLI and the server), torch-free."""
from __future__ import annotations


class NonFiniteOutput(RuntimeError):
    """The model computed NaN or infinite logits: its weights (a scale of a converted store, a shard) hold
    non-finite values. Generation stops instead of sampling garbage (the server answers 500)."""
