"""SwiGLU MLP: the dense layers and the shared expert(s). down(silu(gate(x)) * up(x)), no biases."""
import torch
import torch.nn.functional as F
from torch import nn


def _linear(i: int, o: int) -> nn.Module:
    return nn.Linear(i, o, bias=False)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, linear=_linear):
        """linear(in, out) -> module: how the projections are built (float nn.Linear by default)."""
        super().__init__()
        self.gate_proj = linear(hidden, inter)
        self.up_proj = linear(hidden, inter)
        self.down_proj = linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [T, H] -> [T, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
