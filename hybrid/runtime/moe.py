"""One MoE layer: the router and the shared expert run on the device; the routed experts run wherever the
expert backend puts them (CPU kernels, or device-resident copies).

The call into the routed experts is two steps, submit then wait, so the shared expert's device work
overlaps with the CPU experts.
"""
from __future__ import annotations

import torch
from torch import nn

from gpu_attn import MLP, Router


class MoE(nn.Module):
    def __init__(self, layer: int, gate: Router, shared_experts: MLP):
        super().__init__()
        self.layer = layer
        self.gate = gate
        self.shared_experts = shared_experts
        self.experts = None          # an ExpertBackend, attached by the loader (not a module: no weights here)
        self.on_route = None         # optional callback(layer, ids, weights) for stats and profiling

    def forward(self, h: torch.Tensor) -> torch.Tensor:     # [T, H] -> [T, H]
        ids, w = self.gate(h)
        if self.on_route is not None:
            self.on_route(self.layer, ids, w)
        ticket = self.experts.submit(self.layer, h, ids, w)
        y = self.shared_experts(h)
        return self.experts.wait(ticket).to(y.dtype) + y
