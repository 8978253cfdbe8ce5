"""Routed-expert backends behind one contract, ExpertBackend:

    ticket = backend.submit(layer, h, ids, w, phase)   # h [T, H], ids [T, k] (-1 = served elsewhere), w [T, k]
    ... the device runs the shared expert meanwhile ...
    y = backend.wait(ticket)                           # [T, H] float32 on h's device:
                                                       #   sum_j w[t, j] * Expert_{ids[t, j]}(h[t])
    backend.end_request(); backend.reset_stats(); backend.stats() -> ExpertStats

- TorchExperts: dequantized float weights as torch tensors on a device. The readable reference, and what
  device-resident experts run on.
- CpuExperts: the Numba kernels of cpu_experts over the packed expert store (INT4 / FP8 / BF16), in the
  background while the device runs the shared expert.
- HybridExperts (hybrid/runtime/hotset.py): a hot set of device copies in front of CpuExperts.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cpu_experts import Ticket as CpuTicket
from hybrid.core.policies import Decision
from hybrid.runtime.staging import HostStaging

# T = tokens, k = experts per token, H = hidden, I = expert width
PHASES = ("prefill", "decode")
LOOKAHEAD = 2          # the hot set's look-ahead: the routers of the next two MoE layers see each layer's input


@dataclass
class ExpertTicket:
    """What submit() started and wait() finishes; one type for every backend."""
    layer: int
    device: torch.device                    # where the result goes (h's device)
    cpu: CpuTicket | None = None            # slots running on the CPU kernels (in the background)
    cpu_out: torch.Tensor | None = None     # [T, H] float32 the CPU kernels already computed (synchronous)
    partial: torch.Tensor | None = None     # [T, H] float32 already computed on the device
    decision: Decision | None = None        # hot-set copies that follow the wait


@dataclass
class Served:
    """Routed (token, expert) activations by where they ran."""
    hot_set: int = 0      # device copies of the hot set
    cpu: int = 0          # the CPU kernels
    device: int = 0       # the torch reference backend (every expert on the device)

    @property
    def total(self) -> int:
        return self.hot_set + self.cpu + self.device


@dataclass(frozen=True)
class CpuKernelStats:
    """cpu_experts.CpuMoE's counters (bytes_read counts each selected expert once per call)."""
    calls: int
    tokens: int
    activations: int
    skipped: int
    experts_read: int
    bytes_read: int
    tile_experts: int
    seconds: float
    threads: int
    paths: tuple[str, ...] = ()     # the kernel paths its layers run (cpu_experts.paths), each once

    @classmethod
    def of(cls, moe, since: "CpuKernelStats | None" = None) -> "CpuKernelStats":
        """CpuMoE's counters now, minus those of `since` (the counters are cumulative in CpuMoE)."""
        s = moe.stats()
        now = cls(s["calls"], s["tokens"], s["activations"], s["skipped"], s["experts_read"], s["bytes_read"],
                  s["tile_experts"], s["seconds"], s["threads"], tuple(sorted(set(moe.paths().values()))))
        if since is None:
            return now
        return cls(*(getattr(now, f) - getattr(since, f) for f in _COUNTERS), threads=now.threads, paths=now.paths)


_COUNTERS = ("calls", "tokens", "activations", "skipped", "experts_read", "bytes_read", "tile_experts", "seconds")


@dataclass
class LayerHotSet:
    """One MoE layer's hot-set counters."""
    hot_set: int = 0
    cpu: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_copied: int = 0
    copy_seconds: float = 0.0
    lookahead_hit: list[int] = field(default_factory=lambda: [0] * (LOOKAHEAD + 1))  # [distance]: ids come true
    lookahead_n: list[int] = field(default_factory=lambda: [0] * (LOOKAHEAD + 1))    # [distance]: ids scored


@dataclass(frozen=True)
class HotSetStats:
    loads: int
    evictions: int
    bytes_copied: int
    copy_seconds: float
    device_seconds: float                        # hot-set hits computed on the device
    wait_seconds: float                          # waiting for the CPU part
    hit_rate: float                              # share of routed activations served by the hot set
    lookahead_precision: dict[int, float | None]  # distance d -> share of layer L+d's choices predicted at L
    capacity_per_layer: dict[int, int]
    per_layer: dict[int, LayerHotSet]


@dataclass(frozen=True)
class ExpertStats:
    backend: str                        # "torch" | "cpu" | "hybrid"
    served: Served
    cpu: CpuKernelStats | None = None   # the CPU kernels' counters (cpu and hybrid backends)
    hot_set: HotSetStats | None = None  # the hot set's (hybrid backend)
    seconds: float = 0.0                # time inside the torch reference backend


class ExpertBackend(ABC):
    """The contract of the module docstring. end_request() is for per-request state (a no-op here)."""

    @abstractmethod
    def submit(self, layer: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, phase: str) -> ExpertTicket:
        ...

    @abstractmethod
    def wait(self, ticket: ExpertTicket) -> torch.Tensor:
        ...

    @abstractmethod
    def stats(self) -> ExpertStats:
        ...

    @abstractmethod
    def reset_stats(self) -> None:
        ...

    def end_request(self) -> None:
        """A request finished: per-request state (a policy's scores) starts over."""


def mix_experts(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, mask, ids_np, weights_of) -> torch.Tensor:
    """sum_j w[t, j] * Expert_{ids[t, j]}(h[t]) over the slots where mask [T, k] (host bool) is set, in float32
    on h's device; weights_of(e) -> (gate [I, H], up [I, H], down [H, I]) torch tensors on that device."""
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    if not mask.any():
        return out
    mask_t = torch.from_numpy(mask).to(ids.device)
    for e in np.unique(ids_np[mask]).tolist():
        tok, slot = torch.nonzero((ids == e) & mask_t, as_tuple=True)
        gate, up, down = weights_of(e)
        x = h[tok].to(gate.dtype)
        y = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down).float()
        out.index_add_(0, tok, y * w[tok, slot, None].float())
    return out


class TorchExperts(ExpertBackend):
    """weights[layer] = (gate [E, I, H], up [E, I, H], down [E, H, I]) torch tensors on one device."""

    def __init__(self, weights: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.weights = weights
        self.reset_stats()

    def reset_stats(self) -> None:
        self.served = Served()
        self.seconds = 0.0

    def submit(self, layer, h, ids, w, phase) -> ExpertTicket:
        t0 = time.perf_counter()
        gate, up, down = self.weights[layer]
        ids_np = ids.cpu().numpy()
        out = mix_experts(h, ids, w, ids_np >= 0, ids_np, lambda e: (gate[e], up[e], down[e]))
        self.served.device += int((ids_np >= 0).sum())
        self.seconds += time.perf_counter() - t0
        return ExpertTicket(layer, h.device, partial=out)

    def wait(self, ticket: ExpertTicket) -> torch.Tensor:
        return ticket.partial

    def stats(self) -> ExpertStats:
        return ExpertStats("torch", Served(**vars(self.served)), seconds=self.seconds)


class CpuExperts(ExpertBackend):
    """Adapter from torch tensors on any device to cpu_experts.CpuMoE (numpy, float32).

    synchronous: run the kernels inside submit() on the calling thread (the CPU is the device: the dense
    layers and the experts take turns on one pool of threads); else in CpuMoE's background thread while the
    device runs the shared expert."""

    def __init__(self, cpu_moe, synchronous: bool = False, staging: HostStaging | None = None):
        """staging: the device<->host hand-off (one copy each way per call; default: for the call's device)."""
        self.moe, self.synchronous, self._staging = cpu_moe, synchronous, staging
        self.reset_stats()

    def reset_stats(self) -> None:
        self.served = Served()
        self._base = CpuKernelStats.of(self.moe)

    def submit(self, layer, h, ids, w, phase) -> ExpertTicket:
        if self._staging is None or self._staging.device != h.device:
            self._staging = HostStaging(h.device)
        hn, idn, wn = self._staging.to_host(h, ids, w)
        self.served.cpu += int((idn >= 0).sum())
        if self.synchronous:
            return ExpertTicket(layer, h.device, cpu_out=self._staging.to_device(self.moe.run(layer, hn, idn, wn)))
        return ExpertTicket(layer, h.device, cpu=self.moe.submit(layer, hn, idn, wn))

    def wait(self, ticket: ExpertTicket) -> torch.Tensor:
        if ticket.cpu is None:
            return ticket.cpu_out
        return self._staging.to_device(self.moe.wait(ticket.cpu))

    def stats(self) -> ExpertStats:
        return ExpertStats("cpu", Served(**vars(self.served)), cpu=CpuKernelStats.of(self.moe, self._base))
