"""SamplingParams: how one request picks its tokens; one validation for the CLI, the Python API and the server.

Torch-free. The runtime's Sampler (hybrid/runtime/sampler.py) applies it; the server maps OpenAI's and
Anthropic's fields onto it; `hybrid generate` builds it from its flags. A bad value raises SamplingError
(a ValueError) naming the field, the value and the accepted range, wherever it came from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

MAX_LOGPROBS = 20                                  # OpenAI's top_logprobs limit
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)           # what torch.Generator.manual_seed accepts


class SamplingError(ValueError):
    """A sampling value is out of range; `field` names it (the server reports it as the bad param)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


GREEDY_BELOW = 1e-4     # temperatures below this sample as greedy (see SamplingParams)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (so is any temperature below GREEDY_BELOW: float32 logits divided by it would
    overflow, and the draw it asks for is the argmax anyway). top_p: nucleus mass in (0, 1] (a tiny one keeps the
    most likely token alone). seed: reproducible sampling (None = random).
    frequency_penalty / presence_penalty: OpenAI's, in [-2, 2], subtracted from the logits of tokens already
    generated (count * frequency + presence). logprobs: None = off, N = the chosen token's log-probability
    and the N most likely alternatives (0..20)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self):
        _finite("temperature", self.temperature, 0.0, math.inf)
        _finite("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _finite("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _finite("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise SamplingError("seed", f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], "
                                        f"got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingError("logprobs", f"logprobs must be an integer in 0..{MAX_LOGPROBS} (alternatives per "
                                            f"token), got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


FIELDS = tuple(f.name for f in fields(SamplingParams))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(name: str, v, lo: float, hi: float, lo_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SamplingError(name, f"{name} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise SamplingError(name, f"{name} must be a finite number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]" if math.isfinite(hi) else f">= {lo:g}"
        raise SamplingError(name, f"{name} must be in {rng}, got {v!r}")
