"""Routed-expert backends behind one interface: submit(layer, h, ids, weights) -> ticket; wait(ticket) -> [T, H].

- TorchExperts: dequantized float weights as torch tensors on a device. The readable reference, and what
  device-resident experts run on.
- CpuExperts: the Numba kernels of cpu_experts over the packed expert store (INT4 / FP8 / BF16), in the
  background while the device runs the shared expert.

Both return sum_j w[t, j] * Expert_{ids[t, j]}(h[t]); an id of -1 is a slot served elsewhere (skipped).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F


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


class TorchExperts:
    """weights[layer] = (gate [E, I, H], up [E, I, H], down [E, H, I]) torch tensors on one device."""

    def __init__(self, weights: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.weights = weights
        self.reset_stats()

    def reset_stats(self) -> None:
        self.activations = 0
        self.seconds = 0.0

    def submit(self, layer: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
        t0 = time.perf_counter()
        gate, up, down = self.weights[layer]
        ids_np = ids.cpu().numpy()
        out = mix_experts(h, ids, w, ids_np >= 0, ids_np, lambda e: (gate[e], up[e], down[e]))
        self.activations += int((ids_np >= 0).sum())
        self.seconds += time.perf_counter() - t0
        return out

    def wait(self, ticket) -> torch.Tensor:
        return ticket

    def stats(self) -> dict:
        return {"activations": self.activations, "seconds": self.seconds}


class CpuExperts:
    """Adapter from torch tensors on any device to cpu_experts.CpuMoE (numpy, float32)."""

    def __init__(self, cpu_moe):
        self.moe = cpu_moe

    def submit(self, layer: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
        hn = np.ascontiguousarray(h.detach().to("cpu", torch.float32).numpy())
        idn = np.ascontiguousarray(ids.detach().to("cpu").numpy())
        wn = np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy())
        return self.moe.submit(layer, hn, idn, wn), h.device

    def wait(self, ticket) -> torch.Tensor:
        t, device = ticket
        return torch.from_numpy(self.moe.wait(t)).to(device)

    def stats(self) -> dict:
        return self.moe.stats()
