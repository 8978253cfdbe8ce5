"""EngineStats: what Engine.stats() returns, one typed record (nested records inside), and its JSON form.

The JSON form (`to_dict()`, what `hybrid generate --json` prints) keeps the keys the dict of earlier releases
had; a new counter is one field here and one argument where Engine.stats() builds the record.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from hybrid.runtime.blocks import PrefixStats
from hybrid.runtime.device_map import DeviceStats
from hybrid.runtime.experts import ExpertStats, Served


@dataclass(frozen=True)
class ExpertActivations:
    """Routed (token, expert) activations by where they ran, and their sum."""
    hot_set: int
    cpu: int
    device: int
    total: int

    @classmethod
    def of(cls, served: Served) -> "ExpertActivations":
        return cls(served.hot_set, served.cpu, served.device, served.total)

    def share(self, tier: str) -> float:
        """The share of all activations that ran in `tier` (hot_set | cpu | device); 0.0 before any."""
        return getattr(self, tier) / self.total if self.total else 0.0


@dataclass(frozen=True)
class SchedulerState:
    """The scheduler's counters since start and its queues now."""
    admitted: int
    preempted: int
    cancelled: int
    finished: int
    running: int
    waiting: int


@dataclass(frozen=True)
class KVBlocks:
    """The paged KV pool: blocks in all, held by requests, idle but keeping a cached prefix; tokens per block."""
    total: int
    in_use: int
    cached: int
    block_size: int


@dataclass(frozen=True)
class EngineStats:
    """Tokens and seconds per phase (see PhaseTimes), tokens/s, routed-expert activations by tier, what ran
    them (format, dense format, device, the CPU kernels' instruction set), the expert backend's counters, the scheduler's, the
    KV pool's and the prefix cache's, and per device of the map its layers, KV bytes and hot-set hits."""
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    generated_tokens: int
    steps: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    expert_activations: ExpertActivations
    experts: str
    dense: str
    device: str
    cpu_kernels: str                      # the CPU kernels' instruction set: avx512 | avx2 | plain
    expert_backend: ExpertStats
    scheduler: SchedulerState
    kv_blocks: KVBlocks
    prefix_cache: PrefixStats
    devices: tuple[DeviceStats, ...]

    def to_dict(self) -> dict:
        """The JSON form: nested plain dicts and lists, the keys named as the fields."""
        return asdict(self)
