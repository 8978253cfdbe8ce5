"""One MoE layer: the router and the shared expert run on the device; the routed experts run wherever the
expert backend puts them (CPU kernels, or device-resident copies).

The call into the routed experts is two steps, submit then wait, so the shared expert's device work
overlaps with the CPU experts. The backend and the routing observer are given to the constructor; the
phase (prefill or decode) comes with each call.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gpu_attn import MLP, Router
from hybrid.runtime.experts import ExpertBackend

# on_route(layer, topk_ids [T, k], topk_weights [T, k], phase): stats, profiling, traces
RouteObserver = Callable[[int, torch.Tensor, torch.Tensor, str], None]


class MoE(nn.Module):
    def __init__(self, layer: int, gate: Router, shared_experts: MLP, experts: ExpertBackend,
                 on_route: RouteObserver | None = None):
        super().__init__()
        self.layer = layer
        self.gate = gate
        self.shared_experts = shared_experts
        self._experts = experts      # not a module: the routed weights live in the backend
        self._on_route = on_route

    def forward(self, h: torch.Tensor, phase: str) -> torch.Tensor:     # [T, H] -> [T, H]
        ids, w = self.gate(h)
        if self._on_route is not None:
            self._on_route(self.layer, ids, w, phase)
        ticket = self._experts.submit(self.layer, h, ids, w, phase)
        y = self.shared_experts(h)
        return self._experts.wait(ticket).to(y.dtype) + y


class RouteListeners:
    """The routing observer a model is built with: calls every added listener (see RouteObserver)."""

    def __init__(self):
        self._fns: list[RouteObserver] = []

    def add(self, fn: RouteObserver) -> Callable[[], None]:
        """Add fn; returns a function that removes it."""
        self._fns.append(fn)
        return lambda: self._fns.remove(fn)

    def __call__(self, layer: int, ids: torch.Tensor, w: torch.Tensor, phase: str) -> None:
        for fn in self._fns:
            fn(layer, ids, w, phase)
