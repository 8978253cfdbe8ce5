"""Hot-set policies: which routed experts one MoE layer keeps on the device. Torch-free.

The engine, the profiler's trace replay and the planner drive these same classes, so a hit rate measured by
replay is the hit rate the engine would see.

One call per layer per forward step:
    d = policy.access(ids, phase)      # ids int [T, k] of this step's tokens (-1 = no expert); phase
                                       # "prefill" or "decode", as the step says
    d.hits                             # bool [T, k]: the slot's expert was resident BEFORE this step
    d.load, d.evict                    # experts to copy to / drop from the device after this step
The policy has already applied d.load / d.evict to `policy.resident`; the engine performs the copies.
    policy.hint(predicted_ids)         # look-ahead predictions (used by router; a no-op for the others)
    policy.end_request()               # per-request state starts over (router); residency stays

Churn is bounded by a transfer budget in experts per token (the engine converts a bytes-per-token budget
with the expert size): credit accrues with every token seen, up to `burst` experts, and each load spends one.
Why: PCIe 4.0 x16 moves about one INT4 K2 expert (~25 MB) per millisecond, while the CPU computes that
expert for one token in a fraction of that; a copy only pays off for an expert that will be reused many
times, so the hot set must change slowly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

POLICIES = ("static", "lru", "lfu", "router")
# transfer_budget="auto": one copy per layer every 16 tokens, so the set drifts slowly and prefill reshapes it
AUTO_LOADS_PER_TOKEN = 1 / 16


@dataclass(frozen=True)
class Decision:
    hits: np.ndarray                   # bool [T, k]
    load: tuple[int, ...] = ()
    evict: tuple[int, ...] = ()


@dataclass
class HotSetPolicy:
    """Base: a resident set of at most `capacity` of `n_experts` experts, and a transfer credit."""
    n_experts: int
    capacity: int
    loads_per_token: float = math.inf  # transfer budget, in experts per token
    burst: float = math.inf            # most credit that can pile up
    resident: set[int] = field(default_factory=set)

    def __post_init__(self):
        if not 0 <= self.capacity <= self.n_experts:
            raise ValueError(f"capacity {self.capacity} must lie in 0..n_experts ({self.n_experts})")
        if self.loads_per_token < 0:
            raise ValueError(f"loads_per_token must be >= 0, got {self.loads_per_token}")
        if len(self.resident) > self.capacity:
            raise ValueError(f"{len(self.resident)} resident experts exceed the capacity {self.capacity}")
        self._credit = 0.0

    name = "base"

    def access(self, ids: np.ndarray, phase: str = "decode") -> Decision:
        ids = np.asarray(ids)
        valid = ids >= 0
        hits = valid & np.isin(ids, np.fromiter(self.resident, dtype=np.int64, count=len(self.resident)))
        self._credit = min(self._credit + ids.shape[0] * self.loads_per_token, self.burst)
        self._observe(ids[valid], ids.shape[0], phase)
        load, evict = self._decide(ids, phase)
        assert len(self.resident) <= self.capacity
        return Decision(hits, tuple(load), tuple(evict))

    def end_request(self) -> None:
        """A request finished; per-request state (router policy) starts over. Residency stays."""

    def hint(self, predicted_ids: np.ndarray) -> None:
        """Look-ahead: experts this layer's router is expected to choose soon (an earlier layer's hidden
        state through this layer's router). Policies that do not use predictions ignore them."""

    # ---- for subclasses -------------------------------------------------------------------------------
    def _observe(self, flat_ids: np.ndarray, n_tokens: int, phase: str) -> None:
        pass

    def _decide(self, ids: np.ndarray, phase: str) -> tuple[list[int], list[int]]:
        return [], []

    def _spend(self) -> bool:
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False

    def _swap(self, want: list[int], victim_order: list[int]) -> tuple[list[int], list[int]]:
        """Load the experts in `want` (in order) while credit lasts, filling free slots first, then
        evicting from `victim_order` (first = first out). Never evicts something loaded in this call."""
        load, evict = [], []
        victims = [v for v in victim_order if v in self.resident]
        for e in want:
            if e in self.resident:
                continue
            if len(self.resident) >= self.capacity:
                if not victims or self.capacity == 0:
                    break
                if not self._spend():
                    break
                v = victims.pop(0)
                self.resident.discard(v)
                evict.append(v)
            elif not self._spend():
                break
            self.resident.add(e)
            load.append(e)
        return load, evict


class StaticPolicy(HotSetPolicy):
    """A fixed hot set (e.g. from a profiler's placement.json); never copies anything at run time."""
    name = "static"


class LRUPolicy(HotSetPolicy):
    """Load a missed expert at once (budget allowing), evicting the least recently used."""
    name = "lru"

    def __post_init__(self):
        super().__post_init__()
        self._tick = 0
        self._last = np.full(self.n_experts, -1, dtype=np.int64)

    def _observe(self, flat_ids, n_tokens, phase):
        for e in flat_ids.tolist():       # order of use within the step sets recency
            self._tick += 1
            self._last[e] = self._tick

    def _decide(self, ids, phase):
        seen = list(dict.fromkeys(ids[ids >= 0].tolist()))
        missed = [e for e in seen if e not in self.resident]
        missed.sort(key=lambda e: -self._last[e])           # most recent first
        victims = sorted(self.resident, key=lambda e: self._last[e])
        return self._swap(missed, victims)


class LFUPolicy(HotSetPolicy):
    """Keep the most frequently used experts (counts over the whole run); load an expert once its count
    exceeds the least-used resident's."""
    name = "lfu"

    def __post_init__(self):
        super().__post_init__()
        self._count = np.zeros(self.n_experts, dtype=np.int64)

    def _observe(self, flat_ids, n_tokens, phase):
        np.add.at(self._count, flat_ids, 1)

    def _decide(self, ids, phase):
        return _promote(self, self._count.astype(np.float64), margin=0.0)


class RouterPolicy(HotSetPolicy):
    """Match the hot set to what the router chooses for THIS request.

    - prefill: count the prompt's expert choices; after each prefill step, load the most-used experts;
    - decode: a decaying count (half-life `half_life` tokens) of recent routing, plus look-ahead hints
      (the next layers' routers applied early, weighted `hint_weight`); an outsider replaces the weakest
      resident only when its score beats it by `hysteresis` (relative) plus `min_gain` (absolute: at least
      one more recent use), so the set changes slowly.
    Counts reset at end_request().
    """
    name = "router"
    half_life: float = 32.0
    hysteresis: float = 0.5
    hint_weight: float = 0.5
    min_gain: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self._score = np.zeros(self.n_experts, dtype=np.float64)

    def _observe(self, flat_ids, n_tokens, phase):
        if phase == "decode":
            self._score *= 0.5 ** (n_tokens / self.half_life)
        np.add.at(self._score, flat_ids, 1.0)

    def hint(self, predicted_ids: np.ndarray) -> None:
        """Look-ahead: experts this layer's router is expected to choose soon (from an earlier layer's
        hidden state). Raises their score a little, so copies can start before they are needed."""
        ids = np.asarray(predicted_ids).ravel()
        np.add.at(self._score, ids[ids >= 0], self.hint_weight)

    def _decide(self, ids, phase):
        if phase == "prefill":
            return _promote(self, self._score, margin=0.0)
        return _promote(self, self._score, margin=self.hysteresis, gain=self.min_gain)

    def end_request(self) -> None:
        self._score[:] = 0.0


def _promote(p: HotSetPolicy, score: np.ndarray, margin: float, gain: float = 0.0) -> tuple[list[int], list[int]]:
    """Bring the top-`capacity` experts by score into the set, replacing a resident only when the
    newcomer's score exceeds the resident's by the relative margin plus the absolute gain."""
    if p.capacity == 0:
        return [], []
    order = np.argsort(-score, kind="stable")
    top = [int(e) for e in order[: p.capacity] if score[e] > 0]
    want = [e for e in top if e not in p.resident]
    if not want:
        return [], []
    victims = sorted(p.resident, key=lambda e: score[e])
    free = p.capacity - len(p.resident)
    load, evict = [], []
    for e in want:
        if free > 0:
            got, _ = p._swap([e], [])
            free -= len(got)
            load += got
            continue
        victims = [v for v in victims if v in p.resident]
        if not victims or score[e] <= score[victims[0]] * (1 + margin) + gain:
            break      # want is in descending score, victims ascending: nothing later can win either
        got, out = p._swap([e], victims[:1])
        load += got
        evict += out
        if not got:
            break      # out of transfer credit
    return load, evict


def make_policy(name: str, n_experts: int, capacity: int, loads_per_token: float = math.inf,
                resident=(), burst: float | None = None) -> HotSetPolicy:
    """A policy by name ("static", "lru", "lfu", "router"), optionally starting from `resident`."""
    table = {"static": StaticPolicy, "lru": LRUPolicy, "lfu": LFUPolicy, "router": RouterPolicy}
    if name not in table:
        raise ValueError(f"unknown prefetch policy {name!r}; choose one of {', '.join(POLICIES)}")
    if burst is None:
        burst = math.inf if math.isinf(loads_per_token) else max(capacity, 1.0)
    return table[name](n_experts, capacity, loads_per_token, burst, set(int(e) for e in resident))
