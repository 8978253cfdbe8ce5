"""Placement: what lives on the device, what in host RAM, and how many routed experts the hot set holds.

plan_placement() is a pure function of the config, the expert format, the context and the memory sizes;
it returns a frozen PlacementPlan that the loader applies once and `hybrid generate` prints at start-up.
Impossible requests (a context whose KV cache does not fit, a store larger than RAM) raise PlanError with
the numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from quant.formats import bytes_per_matrix

from hybrid.core.config import ModelConfig
from hybrid.core.weights import dense_tensors, device_nbytes, expert_shapes

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanError(ValueError):
    """The requested placement cannot work on this machine; the message carries the numbers."""


def parse_size(text: str | int | float) -> int:
    """"2GiB", "500MB", "1.5e9", 123 -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size must be >= 0, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 2GiB, 500MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: float) -> str:
    """Bytes for people: GiB with two decimals, MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class PlacementPlan:
    device: str
    compute_dtype_bytes: int
    context: int
    device_memory: int          # bytes the plan may use on the device
    dense_bytes: int            # embeddings, attention, router, shared experts, dense MLPs, lm_head
    kv_cache_bytes: int         # compressed MLA cache for `context` tokens
    expert_device_bytes: int    # one resident routed expert on the device (dequantized)
    experts_per_layer: int      # hot-set capacity of each MoE layer
    moe_layers: int
    n_routed_experts: int
    expert_format: str
    expert_host_bytes: int      # one routed expert in the host store
    host_store_bytes: int       # all routed experts in host RAM
    host_memory: int
    mmap: bool

    @property
    def hot_set_bytes(self) -> int:
        return self.experts_per_layer * self.moe_layers * self.expert_device_bytes

    @property
    def hot_set_share(self) -> float:
        return self.experts_per_layer / self.n_routed_experts if self.n_routed_experts else 0.0

    def describe(self) -> str:
        return "\n".join([
            f"placement on {self.device} (context {self.context} tokens):",
            f"  device: dense weights {gib(self.dense_bytes)} + KV cache {gib(self.kv_cache_bytes)} + hot set "
            f"{gib(self.hot_set_bytes)} ({self.experts_per_layer}/{self.n_routed_experts} experts x "
            f"{self.moe_layers} MoE layers, {self.hot_set_share:.0%}) of {gib(self.device_memory)}",
            f"  host:   routed experts ({self.expert_format}) {gib(self.host_store_bytes)} of "
            f"{gib(self.host_memory)} RAM{' (memory-mapped)' if self.mmap else ''}",
        ])


def expert_host_bytes(cfg: ModelConfig, fmt: str, group_size: int = 32) -> int:
    return sum(bytes_per_matrix(fmt, r, c, group_size) for r, c in expert_shapes(cfg))


def dense_device_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    return sum(device_nbytes(name, spec, dtype_bytes) for name, spec in dense_tensors(cfg).items())


def kv_cache_bytes(cfg: ModelConfig, context: int, dtype_bytes: int) -> int:
    return context * cfg.num_hidden_layers * cfg.kv_cache_dim * dtype_bytes


def plan_placement(cfg: ModelConfig, *, device: str, dtype_bytes: int, expert_format: str, context: int,
                   device_memory: int, host_memory: int, gpu_expert_budget: int | str | float = 0,
                   mmap: bool = False, group_size: int = 32) -> PlacementPlan:
    """Decide the placement. gpu_expert_budget: bytes (int or "2GiB") or a share of all routed experts
    ("25%"); the hot set gets that much, capped by what the device has left after dense weights and KV."""
    if context <= 0 or context > cfg.max_position_embeddings:
        raise PlanError(f"context {context} must lie in 1..{cfg.max_position_embeddings} (max_position_embeddings)")
    moe = len(cfg.moe_layers)
    dense = dense_device_bytes(cfg, dtype_bytes)
    kv = kv_cache_bytes(cfg, context, dtype_bytes)
    per_expert_dev = 3 * cfg.hidden_size * cfg.moe_intermediate_size * dtype_bytes
    host_one = expert_host_bytes(cfg, expert_format, group_size)
    host_store = host_one * cfg.n_routed_experts * moe
    fixed = dense + kv
    if fixed > device_memory:
        max_ctx = max(0, (device_memory - dense) // max(1, kv // context))
        raise PlanError(
            f"the device needs {gib(dense)} for dense weights + {gib(kv)} of KV cache for {context} tokens = "
            f"{gib(fixed)}, but {gib(device_memory)} is available; the most context that fits is about "
            f"{max_ctx} tokens (lower --context / max_new_tokens, or use a device with more memory)")
    if host_store > host_memory and not mmap:
        raise PlanError(
            f"the routed experts take {gib(host_store)} in {expert_format} but the host has {gib(host_memory)} "
            f"of RAM available; use a converted store (memory-mapped) or a smaller format such as int4")
    capacity = _capacity(cfg, gpu_expert_budget, per_expert_dev, moe)
    room = (device_memory - fixed) // max(1, per_expert_dev * moe) if moe else 0
    capacity = max(0, min(capacity, room, cfg.n_routed_experts))
    return PlacementPlan(device, dtype_bytes, context, device_memory, dense, kv, per_expert_dev, capacity, moe,
                         cfg.n_routed_experts, expert_format, host_one, host_store, host_memory, mmap)


def share_of_experts(text, n_experts: int, what: str = "budget") -> int | None:
    """"25%" -> experts per layer (rounded down); None when `text` is not a share."""
    if not (isinstance(text, str) and text.strip().endswith("%")):
        return None
    try:
        share = float(text.strip()[:-1]) / 100
    except ValueError:
        raise ValueError(f"cannot read {what} {text!r}; write e.g. 25%") from None
    if not 0 <= share <= 1:
        raise ValueError(f"a {what} share must lie in 0%..100%, got {text!r}")
    return int(share * n_experts + 1e-9)


def _capacity(cfg: ModelConfig, budget, per_expert_dev: int, moe: int) -> int:
    n = share_of_experts(budget, cfg.n_routed_experts)
    if n is not None:
        return n
    b = parse_size(budget or 0)
    return b // (per_expert_dev * moe) if moe else 0
