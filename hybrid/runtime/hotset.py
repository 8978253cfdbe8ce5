"""The device hot set: device copies of chosen routed experts, per MoE layer, kept by a policy.

HybridExperts is an expert backend (submit / wait, like CpuExperts) that splits each layer's routed slots:
    submit(layer, h, ids, w)                                  h, ids, w on the device
      decision = policy[layer].access(ids)                    hits = slots whose expert is resident now
      CPU:    ids with the hit slots set to -1 -> CpuExperts.submit (background thread, Numba kernels)
      device: the hit slots through the resident copies (meanwhile, on the device)
      look-ahead: the routers of layers L+1 and L+2 applied to this h -> hints for their policies
    wait(ticket) -> CPU part + device part; then the copies the policy decided (load / evict), timed
Resident experts are dequantized to the compute dtype on the device. On CUDA a load copies the expert's
packed bytes (pinned staging) on a side stream and decodes them there (hybrid/expert_copy.py), and the
layer's next use waits on that copy's event; on the CPU stand-in it is numpy's decoder plus a real, timed
memory copy. Results do not depend on where an expert ran beyond the CPU kernel's own
rounding (both sides use the same stored weights).
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from hybrid.runtime.expert_copy import device_expert
from hybrid.runtime.experts import mix_experts
from hybrid.core.policies import HotSetPolicy

# T = tokens, k = experts per token, H = hidden, I = expert width


class HybridExperts:
    def __init__(self, cpu, stores: dict, policies: dict[int, HotSetPolicy], device: torch.device,
                 dtype: torch.dtype, lookahead: dict | None = None):
        """cpu: a CpuExperts; stores: layer -> LayerStore (source of copies); policies: layer -> policy;
        lookahead: layer -> [(target layer, Router)] applied to that layer's MoE input."""
        self.cpu, self.stores, self.policies = cpu, stores, policies
        self.device, self.dtype = device, dtype
        self.lookahead = lookahead or {}
        self.resident: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {L: {} for L in policies}
        self.phase = "prefill"
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._ready: dict[int, torch.cuda.Event] = {}
        self._pred: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)   # target -> (distance, ids)
        self.reset_stats()
        for L, p in policies.items():        # a static placement (or any preset set) is copied at start
            self._copy(L, sorted(p.resident), [], count=False)

    # ---- backend interface ---------------------------------------------------------------------------
    def submit(self, layer: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
        ids_np = ids.detach().cpu().numpy()
        self._score_lookahead(layer, ids_np)
        decision = self.policies[layer].access(ids_np, self.phase)
        cpu_ids = ids.masked_fill(torch.from_numpy(decision.hits).to(ids.device), -1)
        ticket = self.cpu.submit(layer, h, cpu_ids, w)
        t0 = time.perf_counter()
        if layer in self._ready:
            torch.cuda.current_stream(self.device).wait_event(self._ready.pop(layer))
        res = self.resident[layer]
        dev = mix_experts(h, ids, w, decision.hits, ids_np, res.__getitem__)
        self._hint(layer, h)
        self._add(layer, hot_set=int(decision.hits.sum()), cpu=int((ids_np >= 0).sum() - decision.hits.sum()))
        self.totals["device_seconds"] += time.perf_counter() - t0
        return ticket, dev, decision, layer

    def wait(self, ticket) -> torch.Tensor:
        cpu_ticket, dev, decision, layer = ticket
        t0 = time.perf_counter()
        out = self.cpu.wait(cpu_ticket).to(dev.device) + dev
        self.totals["wait_seconds"] += time.perf_counter() - t0
        self._copy(layer, decision.load, decision.evict)
        return out

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def end_request(self) -> None:
        for p in self.policies.values():
            p.end_request()
        self._pred.clear()

    # ---- stats ----------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.per_layer = {L: defaultdict(float) for L in self.policies}
        self.totals = defaultdict(float)

    def stats(self) -> dict:
        layers = {L: dict(v) for L, v in self.per_layer.items()}
        tot = {k: sum(v.get(k, 0.0) for v in layers.values())
               for k in ("hot_set", "cpu", "loads", "evictions", "bytes_copied", "copy_seconds")}
        for d in (1, 2):
            n = sum(v.get(f"lookahead{d}_n", 0.0) for v in layers.values())
            ok = sum(v.get(f"lookahead{d}_hit", 0.0) for v in layers.values())
            # predicted and actual sets are both top-k, so precision and recall are the same number
            tot[f"lookahead_L+{d}_precision"] = tot[f"lookahead_L+{d}_recall"] = ok / n if n else None
        served = tot["hot_set"] + tot["cpu"]
        return {**tot, **dict(self.totals), "hit_rate": tot["hot_set"] / served if served else 0.0,
                "capacity_per_layer": {L: p.capacity for L, p in self.policies.items()},
                "per_layer": layers, "cpu_backend": self.cpu.stats()}

    # ---- internals ------------------------------------------------------------------------------------
    def _add(self, layer: int, **kv) -> None:
        for k, v in kv.items():
            self.per_layer[layer][k] += v

    def _copy(self, layer: int, load, evict, count: bool = True) -> None:
        if not load and not evict:
            return
        t0 = time.perf_counter()
        res = self.resident[layer]
        for e in evict:
            res.pop(e, None)
        nbytes = 0
        for e in load:
            if self._cuda:         # the packed bytes travel; the dequantization runs on the device
                self._stream.wait_stream(torch.cuda.current_stream(self.device))   # evicted blocks are free
                with torch.cuda.stream(self._stream):
                    res[e] = device_expert(self.stores[layer], e, self.device, self.dtype)
                for t in res[e]:       # used on the main stream: the allocator must not reuse it before
                    t.record_stream(torch.cuda.current_stream(self.device))
            else:                  # the CPU stand-in: numpy's reference decoder is the faster one here
                mats = self.stores[layer].dequantize(e)
                res[e] = tuple(torch.from_numpy(m).to(self.device, self.dtype, copy=True) for m in mats)
            nbytes += sum(t.numel() * t.element_size() for t in res[e])
        if self._cuda and load:
            ev = torch.cuda.Event()
            ev.record(self._stream)
            self._ready[layer] = ev
        if count:
            self._add(layer, loads=len(load), evictions=len(evict), bytes_copied=nbytes,
                      copy_seconds=time.perf_counter() - t0)

    def _hint(self, layer: int, h: torch.Tensor) -> None:
        for target, router in self.lookahead.get(layer, ()):
            pred, _ = router(h)
            pred = pred.detach().cpu().numpy()
            self._pred[target].append((target - layer, pred))
            hint = getattr(self.policies[target], "hint", None)
            if hint is not None:
                hint(pred)

    def _score_lookahead(self, layer: int, actual: np.ndarray) -> None:
        for d, pred in self._pred.pop(layer, []):
            if pred.shape != actual.shape:
                continue
            hit = sum(len(set(p.tolist()) & set(a.tolist())) for p, a in zip(pred, actual))
            self._add(layer, **{f"lookahead{d}_hit": hit, f"lookahead{d}_n": actual.size})
