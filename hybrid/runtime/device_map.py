"""The device map at run time: the torch device of each layer, and what each device keeps.

    DeviceMap.of(plan, devices)      the plan's DeviceShares (hybrid.core.device_map, the split `hybrid plan`
                                     prints) on torch devices: spans of contiguous layers, in layer order
    dmap.device_of(layer), dmap.first (embeddings), dmap.last (final norm + lm_head), dmap.tensor_device(name)
    KVPools(dmap, n_blocks, ...)     one KVPool per device for its own layers; block ids shared by all
    device_stats(dmap, kv, stats)    per device: its layers, KV bytes, hot-set hits and copies

What each device holds besides its layers' modules: its rope tables and dense-module factory (the model's
DevicePart), its KV pool, and for its MoE layers its own ExpertCopier and DecodeBuffer (HybridExperts). The CPU
experts and their threads serve every device. The hidden state crosses to the next device at a span's start
(K2Model.hidden): one [T, H] copy per boundary per step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hybrid.core.placement import PlacementPlan
from hybrid.runtime.batch import KVPool
from hybrid.runtime.experts import ExpertStats


@dataclass(frozen=True)
class DeviceSpan:
    """One device of the map and what it holds."""
    index: int                  # the device's place in the map (the plan's DeviceShare.index)
    device: torch.device
    layers: range               # contiguous; empty on a device that holds only the embeddings or lm_head
    embed: bool                 # the embedding table (the first device)
    head: bool                  # the final norm and lm_head (the last device)


@dataclass(frozen=True)
class DeviceMap:
    spans: tuple[DeviceSpan, ...]

    @classmethod
    def one(cls, device: torch.device, n_layers: int) -> "DeviceMap":
        """Everything on one device."""
        return cls((DeviceSpan(0, device, range(n_layers), True, True),))

    @classmethod
    def of(cls, plan: PlacementPlan, devices: Sequence[torch.device]) -> "DeviceMap":
        """The plan's split on `devices` (in the plan's order; devices past the split's last one stay unused)."""
        return cls(tuple(DeviceSpan(s.index, devices[s.index], s.layers, s.embed, s.head) for s in plan.shares))

    def span_of(self, layer: int) -> DeviceSpan:
        for s in self.spans:
            if layer in s.layers:
                return s
        raise KeyError(f"layer {layer} is on no device of the map")

    def device_of(self, layer: int) -> torch.device:
        return self.span_of(layer).device

    @property
    def first(self) -> torch.device:
        return self.spans[0].device

    @property
    def last(self) -> torch.device:
        return self.spans[-1].device

    def tensor_device(self, name: str) -> torch.device:
        """Where the checkpoint tensor `name` lives: its layer's device; embeddings first, norm + lm_head last."""
        if name.startswith("model.layers."):
            return self.device_of(int(name.split(".")[2]))
        return self.first if name.startswith("model.embed_tokens.") else self.last


class KVPools:
    """The paged compressed cache of a device map: one KVPool per device for its own layers. Block ids are
    shared (one BlockManager), so every pool has the same blocks; a block's rows for layer L live on L's device."""

    def __init__(self, dmap: DeviceMap, n_blocks: int, block_size: int, width: int, dtype: torch.dtype):
        self.n_blocks, self.block_size = n_blocks, block_size
        self.pools = tuple(KVPool(len(s.layers), n_blocks, block_size, width, dtype, s.device) for s in dmap.spans)
        self._layers = [p.kv[i] for p, s in zip(self.pools, dmap.spans) for i in range(len(s.layers))]

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's cache [n_blocks * block_size, D] on its device."""
        return self._layers[i]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools)


@dataclass(frozen=True)
class DeviceStats:
    """One device's part of a run (Engine.stats().devices)."""
    index: int
    device: str
    layers: tuple[int, ...]     # (first, last), () when it holds none
    embed: bool
    head: bool
    kv_bytes: int
    hot_set_hits: int           # routed activations its MoE layers served from its hot set
    cpu_activations: int        # ... and sent to the (shared) CPU experts, when it has a hot set
    hot_set_loads: int          # experts copied into its hot set
    bytes_copied: int


def device_stats(dmap: DeviceMap, kv: KVPools, stats: ExpertStats) -> tuple[DeviceStats, ...]:
    """Per device of the map: its layers, KV bytes and hot-set counters (summed over its MoE layers)."""
    per_layer = stats.hot_set.per_layer if stats.hot_set is not None else {}
    out = []
    for s, pool in zip(dmap.spans, kv.pools):
        mine = [c for L, c in per_layer.items() if L in s.layers]
        out.append(DeviceStats(
            s.index, str(s.device), (s.layers.start, s.layers.stop - 1) if len(s.layers) else (), s.embed, s.head,
            pool.nbytes, sum(c.hot_set for c in mine), sum(c.cpu for c in mine), sum(c.loads for c in mine),
            sum(c.bytes_copied for c in mine)))
    return tuple(out)
