"""YaRN rotary embedding over the checkpoint's interleaved pair layout.

The 64 rotary dims of q_pe / k_pe are stored as interleaved pairs (x[2i], x[2i+1]) rotated by
pos * inv_freq[i] (DeepSeek inference, llama.cpp NORM rope). Applying NeoX rotate_half to that layout
without de-interleaving is a known, silent error (|dlogit| ~ 3.5e-2 on a tiny model); here the pairs are
rotated in place, so the output keeps the interleaved order. q and k use the same order, so the dot
products equal HF's [evens | odds] form exactly.

YaRN's mscale multiplies the softmax scale (mscale_all_dim), not cos/sin: the cos/sin factor is
yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim), which is 1.0 for K2 and V3.
"""
from __future__ import annotations

import math

import torch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(qk_head_dim: int, rope_type: str, factor: float, mscale_all_dim: float) -> float:
    """dq^-0.5, times yarn_mscale(factor, mscale_all_dim)^2 under YaRN (0.130861 for K2-0711)."""
    scale = qk_head_dim ** -0.5
    if rope_type == "yarn" and mscale_all_dim:
        m = yarn_mscale(factor, mscale_all_dim)
        scale *= m * m
    return scale


def yarn_inv_freq(dim: int, theta: float, factor: float, orig_max_pos: int,
                  beta_fast: float, beta_slow: float) -> torch.Tensor:
    """float64 [dim/2] frequencies: original below the ramp, divided by `factor` above it."""
    extra = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inter = extra / factor

    def find_dim(n_rot: float) -> float:
        return dim * math.log(orig_max_pos / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(find_dim(beta_fast)), 0)
    high = min(math.ceil(find_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return inter * ramp + extra * (1 - ramp)


class YarnRope:
    """Precomputed cos/sin tables; `apply(x, positions)` rotates the interleaved pairs of x's last dim."""

    def __init__(self, dim: int, theta: float, rope_type: str = "yarn", factor: float = 1.0,
                 original_max_position_embeddings: int = 4096, beta_fast: float = 32.0,
                 beta_slow: float = 1.0, mscale: float = 1.0, mscale_all_dim: float = 0.0,
                 max_positions: int = 4096, device: torch.device | str = "cpu"):
        if rope_type == "yarn":
            inv_freq = yarn_inv_freq(dim, theta, factor, original_max_position_embeddings, beta_fast, beta_slow)
            attn = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            attn = 1.0
        self.inv_freq = inv_freq.to(torch.float32)
        self.attn_factor = attn
        self.device = torch.device(device)
        self._cos = self._sin = None
        self._grow(max_positions)

    def _grow(self, n: int) -> None:
        # Tables computed like transformers: float32 outer product, then cos/sin (bit-equal angles).
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        self._cos = (freqs.cos() * self.attn_factor).to(self.device)
        self._sin = (freqs.sin() * self.attn_factor).to(self.device)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, max_pos: int | None = None) -> torch.Tensor:
        """x [..., T, (heads,) dim] with T matching positions [T] -> same shape, pairs rotated.

        The rotary axis is the last one; positions index the token axis, which must be dim -2 (single
        head, [T, dim]) or -3 ([T, heads, dim]). max_pos: a bound on positions the caller knows (no device
        sync to find it); the tables grow to cover it.
        """
        top = int(positions.max()) if max_pos is None else max_pos
        if top >= self._cos.shape[0]:
            self._grow(max(top + 1, 2 * self._cos.shape[0]))
        cos = self._cos[positions].to(x.dtype)
        sin = self._sin[positions].to(x.dtype)
        if x.dim() == 3:   # [T, heads, dim]
            cos, sin = cos[:, None, :], sin[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x1 * cos + x0 * sin
        return out
