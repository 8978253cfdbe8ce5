"""The device hot set: device copies of chosen routed experts, per MoE layer, kept by a policy.

HybridExperts is an ExpertBackend (hybrid/runtime/experts.py) that splits each layer's routed slots:
    submit(layer, h, ids, w, phase)                           h, ids, w on the device
      decision = policy[layer].access(ids, phase)             hits = slots whose expert is resident now
      CPU:    ids with the hit slots set to -1 -> CpuExperts.submit (background thread, Numba kernels)
      device: the hit slots through the resident copies (meanwhile, on the device)
      look-ahead: the routers of layers L+1 and L+2 applied to this h -> hints for their policies
    wait(ticket) -> CPU part + device part; then the copies the policy decided (load / evict), timed
Resident experts are kept in one of two forms (hot_set_format, chosen by the placement plan):
    packed  the store's bytes (INT4 codes + scales, or FP8 codes + block scales: 3.6x / 2.0x fewer bytes than
            bf16 for K2), decoded for each use into one DecodeBuffer per device, then multiplied as below
    bf16    dequantized to the compute dtype once, at load
Both multiply the same compute-dtype weights with the same ops, so tokens and logits do not depend on the form.
Copies go through the device's ExpertCopier (hybrid/runtime/expert_copy.py): on CUDA the packed bytes are staged
in reused pinned slots and cross on the copier's side stream, and the layer's next use waits on that copy's
event; on the CPU stand-in a copy is a real, timed memory copy. With a device map each device has its own
ExpertCopier and DecodeBuffer for its MoE layers (so each link moves its experts at once with the others); the
CPU experts behind them are one, shared. Results do not depend on where an expert ran
beyond the CPU kernel's own rounding (both sides use the same stored weights).
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from gpu_attn import Router
from hybrid.core.policies import HotSetPolicy
from hybrid.core.placement import resolve_hot_set_format
from hybrid.runtime.device_map import DeviceMap
from hybrid.runtime.expert_copy import DecodeBuffer, ExpertCopier, PackedExpert
from hybrid.runtime.experts import (LOOKAHEAD, CpuExperts, ExpertBackend, ExpertStats, ExpertTicket, HotSetStats,
                                    LayerHotSet, Served, mix_experts)

# T = tokens, k = experts per token, H = hidden, I = expert width


class HybridExperts(ExpertBackend):
    def __init__(self, cpu: CpuExperts, stores: dict, policies: dict[int, HotSetPolicy], devices: DeviceMap,
                 dtype: torch.dtype, routers: dict[int, Router] | None = None, hot_set_format: str = "bf16"):
        """cpu: the CPU backend for the rest; stores: layer -> LayerStore (source of copies); policies: layer ->
        policy; devices: where each layer runs (its device's copier and buffer hold its hot experts); routers:
        MoE layer -> its Router, for look-ahead (layer L's input through the routers of the next LOOKAHEAD MoE
        layers); hot_set_format: "packed" | "bf16" (PlacementPlan.hot_set_format). Experts the policies start
        with (a static placement) are copied now."""
        self.cpu, self.stores, self.policies = cpu, stores, policies
        self.dtype = dtype
        self.resident: dict[int, dict[int, PackedExpert | tuple[torch.Tensor, ...]]] = {L: {} for L in policies}
        spec = next(iter(stores.values())).spec
        self.packed = resolve_hot_set_format(hot_set_format, spec.fmt) == "packed"
        spans = {L: devices.span_of(L) for L in policies}
        used = {s.index: s for s in spans.values()}
        self.copiers = {i: ExpertCopier(s.device) for i, s in used.items()}              # one per device
        self.buffers = {i: DecodeBuffer(spec, s.device, dtype) for i, s in used.items()} if self.packed else {}
        self._device = {L: s.device for L, s in spans.items()}
        self._copier = {L: self.copiers[s.index] for L, s in spans.items()}
        self._buffer = {L: self.buffers[s.index] for L, s in spans.items()} if self.packed else {}
        self.lookahead = _lookahead(routers or {}, self._device)
        self._ready: dict[int, torch.cuda.Event] = {}
        self._pred: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)   # target -> (distance, ids)
        self.reset_stats()
        for L, p in policies.items():
            self._copy(L, sorted(p.resident), [], count=False)

    # ---- the backend contract ------------------------------------------------------------------------
    def submit(self, layer, h, ids, w, phase) -> ExpertTicket:
        ids_np = ids.detach().cpu().numpy()
        self._score_lookahead(layer, ids_np)
        decision = self.policies[layer].access(ids_np, phase)
        cpu_ids = ids.masked_fill(torch.from_numpy(decision.hits).to(ids.device), -1)
        ticket = self.cpu.submit(layer, h, cpu_ids, w, phase)
        t0 = time.perf_counter()
        if layer in self._ready:
            torch.cuda.current_stream(self._device[layer]).wait_event(self._ready.pop(layer))
        ticket.partial = mix_experts(h, ids, w, decision.hits, ids_np, self._weights(layer))
        ticket.decision = decision
        self._hint(layer, h)
        hits = int(decision.hits.sum())
        c = self.per_layer[layer]
        c.hot_set += hits
        c.cpu += int((ids_np >= 0).sum()) - hits
        self.device_seconds += time.perf_counter() - t0
        return ticket

    def wait(self, ticket: ExpertTicket) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.cpu.wait(ticket) + ticket.partial
        self.wait_seconds += time.perf_counter() - t0
        self._copy(ticket.layer, ticket.decision.load, ticket.decision.evict)
        return out

    def end_request(self) -> None:
        for p in self.policies.values():
            p.end_request()
        self._pred.clear()

    def reset_stats(self) -> None:
        self.cpu.reset_stats()
        self.per_layer = {L: LayerHotSet() for L in self.policies}
        self.device_seconds = self.wait_seconds = 0.0

    def stats(self) -> ExpertStats:
        layers = self.per_layer
        hot, cpu = sum(c.hot_set for c in layers.values()), sum(c.cpu for c in layers.values())
        precision = {}
        for d in range(1, LOOKAHEAD + 1):
            n = sum(c.lookahead_n[d] for c in layers.values())
            ok = sum(c.lookahead_hit[d] for c in layers.values())
            precision[d] = ok / n if n else None     # predicted and actual sets are both top-k: precision = recall
        hs = HotSetStats(
            loads=sum(c.loads for c in layers.values()), evictions=sum(c.evictions for c in layers.values()),
            bytes_copied=sum(c.bytes_copied for c in layers.values()),
            copy_seconds=sum(c.copy_seconds for c in layers.values()), device_seconds=self.device_seconds,
            wait_seconds=self.wait_seconds, hit_rate=hot / (hot + cpu) if hot + cpu else 0.0,
            lookahead_precision=precision, capacity_per_layer={L: p.capacity for L, p in self.policies.items()},
            per_layer={L: _copy_of(c) for L, c in layers.items()})
        return ExpertStats("hybrid", Served(hot_set=hot, cpu=cpu), cpu=self.cpu.stats().cpu, hot_set=hs)

    # ---- internals ------------------------------------------------------------------------------------
    def _copy(self, layer: int, load, evict, count: bool = True) -> None:
        if not load and not evict:
            return
        t0 = time.perf_counter()
        res = self.resident[layer]
        for e in evict:
            res.pop(e, None)
        nbytes = 0
        for e in load:
            res[e] = self._load(layer, e)
            nbytes += _nbytes(res[e])
        ready = self._copier[layer].record() if load else None
        if ready is not None:
            self._ready[layer] = ready
        if count:
            c = self.per_layer[layer]
            c.loads += len(load)
            c.evictions += len(evict)
            c.bytes_copied += nbytes
            c.copy_seconds += time.perf_counter() - t0

    def _load(self, layer: int, e: int) -> PackedExpert | tuple[torch.Tensor, ...]:
        """Expert e of `layer` on the device: packed, or (gate, up, down) in the compute dtype."""
        if self.packed:
            return self._copier[layer].packed(self.stores[layer], e)
        return self._copier[layer].dequantized(self.stores[layer], e, self.dtype)

    def _weights(self, layer: int):
        """e -> (gate, up, down) in the compute dtype: a packed expert decoded into the buffer, else its own."""
        res = self.resident[layer]
        if self.packed:
            buffer = self._buffer[layer]
            return lambda e: buffer.weights(res[e])
        return res.__getitem__

    def _hint(self, layer: int, h: torch.Tensor) -> None:
        for target, router, move in self.lookahead.get(layer, ()):
            pred, _ = router(h if move is None else h.to(move))
            pred = pred.detach().cpu().numpy()
            self._pred[target].append((target - layer, pred))
            self.policies[target].hint(pred)

    def _score_lookahead(self, layer: int, actual: np.ndarray) -> None:
        c = self.per_layer[layer]
        for d, pred in self._pred.pop(layer, []):
            if pred.shape != actual.shape:
                continue
            hit = sum(len(set(p.tolist()) & set(a.tolist())) for p, a in zip(pred, actual))
            c.lookahead_hit[d] += hit
            c.lookahead_n[d] += actual.size


def _nbytes(x: PackedExpert | tuple[torch.Tensor, ...]) -> int:
    return x.nbytes if isinstance(x, PackedExpert) else sum(t.numel() * t.element_size() for t in x)


def _copy_of(c: LayerHotSet) -> LayerHotSet:
    return LayerHotSet(**{**vars(c), "lookahead_hit": list(c.lookahead_hit), "lookahead_n": list(c.lookahead_n)})


def _lookahead(routers: dict[int, Router], device: dict[int, torch.device]) -> dict[int, list[tuple]]:
    """MoE layer L -> [(L', router of L', the device to move L's input to, None when it is already there)] for
    the next LOOKAHEAD MoE layers L' (a router beyond a device boundary lives on the next device)."""
    moe = sorted(routers)
    return {L: [(t, routers[t], device[t] if device[t] != device[L] else None)
                for t in moe[i + 1:i + 1 + LOOKAHEAD]] for i, L in enumerate(moe)}
