"""The device map: which contiguous layers each device holds, and the largest hot set that fits on all of them.

One code path for `hybrid plan` (hybrid/plan/planner.py: the planner's ModelCost on a machine's GPUs) and for
hybrid.load (hybrid/core/placement.py: DeviceBytes, the runtime's own byte counts, on the devices it was given),
so the placement a plan prints is the placement the runtime performs.

    split_layers(cost, devices, context, cap) -> [DeviceShare] | None    with `cap` hot experts per MoE layer
    place(cost, devices, context, want) -> ([DeviceShare], cap)           cap = min(want, the most that fits)

The split fills the devices in order, each taking what fits: the embeddings, then each layer (its dense weights,
its KV cache for `context` tokens, its hot experts), then the final norm + lm_head. A layer is never split
inside a device, so devices past the last one needed stay unused. Packed dense layers on CUDA are dequantized
into one buffer per device, the size of the largest packed linear that device holds. A packed hot set keeps one decode buffer on
every device (room kept on each). Every MoE layer holds the same number of hot experts, as the runtime keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol



class PlanError(ValueError):
    """The requested placement cannot work on this machine; the message carries the numbers."""


def gib(n: float) -> str:
    """Bytes for people: GiB with two decimals, MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class MapCost(Protocol):
    """The bytes a split reads. hybrid.plan.perf.ModelCost has these fields; DeviceBytes (placement.py) computes
    them for the runtime."""
    layers: tuple[tuple[bool, int, int, int], ...]   # per layer: (is MoE, attention bytes, MLP bytes, params)
    embed_bytes: int                                 # the embedding table
    head_bytes: int                                  # final norm + lm_head
    kv_bytes_per_token: int                          # KV cache of one token in one layer
    expert_device: int                               # one resident hot-set expert
    decode_buffer: int                               # a packed hot set's decode buffer, one per device
    n_experts: int                                   # routed experts per MoE layer
    dense_buffers: tuple[int, ...]                   # per part (embeddings, each layer, head): the largest packed
                                                     # dense linear dequantized there (a device's buffer: the
                                                     # largest of its parts'); () or zeros: none


@dataclass(frozen=True)
class Devices:
    """The devices a map may spread over: `count` alike, each offering `usable` bytes.

    name: one device in words, for errors ("A100-80GB SXM4"); reserve: bytes held back on each (named in errors;
    None when the caller keeps none); kind: what a layer is not split inside ("GPU", "device")."""
    count: int
    usable: int
    name: str
    reserve: int | None = None
    kind: str = "GPU"


@dataclass(frozen=True)
class DeviceShare:
    """What one device of a map holds: layers first_layer..last_layer (none when last < first), the embeddings
    and/or the final norm + lm_head, and their bytes (hot_bytes include a packed hot set's decode buffer)."""
    index: int
    first_layer: int
    last_layer: int
    embed: bool
    head: bool
    dense_bytes: int
    kv_bytes: int
    hot_bytes: int
    free_bytes: int
    dense_buffer: int = 0        # of dense_bytes: the buffer packed dense linears are dequantized into (CUDA)

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)

    def describe(self, moe_on_gpu: int, per_layer: int, name: str | None = None) -> str:
        """One line: what this device (named `name`, default "GPU <index>") holds."""
        parts = (["embeddings"] if self.embed else []) + \
            ([f"layers {self.first_layer}-{self.last_layer}"] if self.last_layer >= self.first_layer else []) + \
            (["lm_head"] if self.head else [])
        return (f"{name or f'GPU {self.index}'}: {' + '.join(parts)}: dense {gib(self.dense_bytes)} + KV "
                f"{gib(self.kv_bytes)} + hot set {gib(self.hot_bytes)} ({per_layer} experts x {moe_on_gpu} MoE "
                f"layers), {gib(self.free_bytes)} free")


def split_layers(cost: MapCost, devices: Devices, context: int, cap: int) -> list[DeviceShare] | None:
    """Contiguous layers per device, filled in order (embeddings first, lm_head last) with `cap` hot experts per
    MoE layer; None when they do not fit."""
    full = devices.usable
    buf = cost.decode_buffer if cap else 0       # a packed hot set's decode buffer, room kept on every device
    usable = full - buf
    kv = context * cost.kv_bytes_per_token
    dbuf = cost.dense_buffers or (0,) * (len(cost.layers) + 2)
    items = [("embed", cost.embed_bytes, 0, 0, dbuf[0])] + [
        (L, a + f, kv, cap * cost.expert_device if moe else 0, dbuf[L + 1])
        for L, (moe, a, f, _) in enumerate(cost.layers)] + [("head", cost.head_bytes, 0, 0, dbuf[-1])]
    shares, g, cur = [], 0, []

    def close(group):
        layers = [it[0] for it in group if isinstance(it[0], int)]
        dense, kvb, hot = (sum(it[i] for it in group) for i in (1, 2, 3))
        dbuf = max(it[4] for it in group)               # this device's dense decode buffer
        dense += dbuf
        hot += buf if hot else 0
        shares.append(DeviceShare(len(shares), layers[0] if layers else 0, layers[-1] if layers else -1,
                                  any(it[0] == "embed" for it in group), any(it[0] == "head" for it in group),
                                  dense, kvb, hot, full - dense - kvb - hot, dbuf))
    used = widest = 0
    for it in items:
        size = it[1] + it[2] + it[3]
        if size + it[4] > usable:
            return None
        if used + size + max(widest, it[4]) > usable:
            close(cur)
            g, cur, used, widest = g + 1, [], 0, 0
            if g >= devices.count:
                return None
        cur.append(it)
        used, widest = used + size, max(widest, it[4])
    close(cur)
    return shares


def place(cost: MapCost, devices: Devices, context: int, want: int) -> tuple[list[DeviceShare], int]:
    """The split with min(want, the most that fits) hot experts per MoE layer; PlanError with the most context
    that fits when even no hot set does."""
    base = split_layers(cost, devices, context, 0)
    if base is None:
        lo, hi = 0, context
        while lo < hi:                                   # the most context that fits, without a hot set
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if split_layers(cost, devices, mid, 0) else (lo, mid - 1)
        total = devices.count * devices.usable
        fixed = cost.embed_bytes + sum(a + f for _, a, f, _ in cost.layers) + cost.head_bytes + \
            max(cost.dense_buffers, default=0)
        kv = context * cost.kv_bytes_per_token * len(cost.layers)
        more = next((n for n in range(devices.count + 1, 65)
                     if split_layers(cost, replace(devices, count=n), context, 0)), None)
        held = f"{more} x {devices.name} would hold it" if more else \
            f"no count of these {devices.kind}s up to 64 would hold it"
        hint = (f"the most context that fits is {lo} tokens (--context {lo}); for {context} tokens {held}" if lo > 0
                else f"even without a KV cache the dense weights do not fit; {held}")
        reserve = f" after a {gib(devices.reserve)} reserve each" if devices.reserve is not None else ""
        raise PlanError(f"{devices.count} x {devices.name} offer {gib(total)}{reserve}, but dense weights take "
                        f"{gib(fixed)} and the KV cache for {context} tokens {gib(kv)} (layers are not split inside "
                        f"a {devices.kind}); {hint}")
    lo, hi = 0, min(want, cost.n_experts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if split_layers(cost, devices, context, mid) else (lo, mid - 1)
    return split_layers(cost, devices, context, lo), lo
