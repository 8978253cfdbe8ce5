"""Multi-head Latent Attention (MLA) with a compressed KV cache.

T = new tokens, S = cached + new tokens, nh = heads, dn/dr/dv = nope/rope/value head dims, r = kv_lora_rank.

Per token and layer the cache holds only c_kv (r values, after kv_a_layernorm) and k_pe (dr values, after
RoPE): 576 values for K2, 35.6x less than per-head K/V. Two equivalent ways to attend over it:
- prefill form ("naive"): expand K_nope and V for every cached token through kv_b_proj, then attend;
  cheap when T is large (the expansion is shared by many queries);
- absorbed decode form: fold kv_b_proj's K half into the query (q_abs = q_nope W_UK, [T, nh, r]) and its
  V half into the output (o = (A c) W_UV^T), so attention runs directly over the cache, like MQA with one
  576-wide KV head; cheap when T is small. Exact: the same dot products in another order.
Both use softmax_scale = dq^-0.5 * yarn_mscale^2 (not r^-0.5).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm
from .rope import YarnRope


class MLACache:
    """Compressed KV cache for all layers: kv [layers, max_len, r + dr] (c_kv | k_pe), preallocated."""

    def __init__(self, n_layers: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.kv = torch.zeros(n_layers, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.max_len = max_len

    def layer(self, i: int) -> torch.Tensor:
        return self.kv[i]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def linear(in_features: int, out_features: int) -> nn.Module:
    """The default projection: a float nn.Linear without bias (a runtime may pass packed ones instead)."""
    return nn.Linear(in_features, out_features, bias=False)


class KVUp(nn.Module):
    """kv_b_proj: c_kv [.., r] -> per-head k_nope | v [.., nh * (dn + dv)], and its two absorbed uses.

    weight [nh * (dn + dv), r] (the checkpoint's kv_b_proj.weight). A runtime may subclass it to keep the
    weight in a packed format; MLA calls only these three methods.
    """

    def __init__(self, kv_lora_rank: int, n_heads: int, qk_nope_head_dim: int, v_head_dim: int):
        super().__init__()
        self.r, self.nh, self.dn, self.dv = kv_lora_rank, n_heads, qk_nope_head_dim, v_head_dim
        self.weight = nn.Parameter(torch.empty(n_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))           # as nn.Linear initializes (training)

    def forward(self, c: torch.Tensor) -> torch.Tensor:             # [S, r] -> [S, nh * (dn + dv)]
        return F.linear(c, self.weight)

    def absorb_q(self, q_nope: torch.Tensor) -> torch.Tensor:       # [T, nh, dn] -> [nh, T, r]
        w = self.weight.view(self.nh, self.dn + self.dv, self.r)
        return torch.bmm(q_nope.transpose(0, 1), w[:, : self.dn])

    def absorb_o(self, lat: torch.Tensor) -> torch.Tensor:          # [nh, T, r] -> [T, nh, dv]
        w = self.weight.view(self.nh, self.dn + self.dv, self.r)
        return torch.bmm(lat, w[:, self.dn:].transpose(1, 2)).transpose(0, 1)


class MLA(nn.Module):
    def __init__(self, hidden: int, n_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, softmax_scale: float,
                 rope: YarnRope, linear=linear, kv_up=KVUp):
        """linear(in, out) -> module: how the projections are built; kv_up: the kv_b_proj class (KVUp)."""
        super().__init__()
        self.nh, self.r = n_heads, kv_lora_rank
        self.dn, self.dr, self.dv = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.scale = softmax_scale
        self.rope = rope
        dq = qk_nope_head_dim + qk_rope_head_dim
        self.q_compressed = q_lora_rank is not None
        if q_lora_rank is None:   # V2-Lite style: no query compression
            self.q_proj = linear(hidden, n_heads * dq)
        else:
            self.q_a_proj = linear(hidden, q_lora_rank)
            self.q_a_layernorm = RMSNorm(q_lora_rank, 1e-6)   # class default eps in every implementation
            self.q_b_proj = linear(q_lora_rank, n_heads * dq)
        self.kv_a_proj_with_mqa = linear(hidden, kv_lora_rank + qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, 1e-6)
        self.kv_b_proj = kv_up(kv_lora_rank, n_heads, qk_nope_head_dim, v_head_dim)
        self.o_proj = linear(n_heads * v_head_dim, hidden)

    def query(self, x: torch.Tensor, pos: torch.Tensor, max_pos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, H] at positions pos [T] -> (q_nope [T, nh, dn], roped q_pe [T, nh, dr]). max_pos: a bound on
        pos known to the caller (saves a device sync)."""
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_compressed else self.q_proj(x)
        q = q.view(x.shape[0], self.nh, self.dn + self.dr)
        return q[..., : self.dn], self.rope.apply(q[..., self.dn:], pos, max_pos)

    def compress(self, x: torch.Tensor, pos: torch.Tensor, max_pos: int | None = None) -> torch.Tensor:
        """[T, H] -> cache rows [T, r + dr]: normed c_kv | roped k_pe."""
        ckv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(ckv[:, : self.r])
        return torch.cat([c, self.rope.apply(ckv[:, self.r:], pos, max_pos)], dim=-1)

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
               absorbed: bool) -> torch.Tensor:
        """Queries at positions pos [T] over cache rows [S, r + dr] of positions 0..S-1, causal -> [T, nh * dv]
        (before o_proj). A single query sees every row (it is the newest token)."""
        T, S = q_nope.shape[0], rows.shape[0]
        mask = None
        if T > 1:   # causal over absolute positions
            mask = torch.arange(S, device=rows.device)[None, :] <= pos[:, None]               # [T, S]
        o = (self._absorbed if absorbed else self._expanded)(q_nope, q_pe, rows, mask)     # [T, nh, dv]
        return o.reshape(T, self.nh * self.dv)

    def forward(self, x: torch.Tensor, start: int = 0, cache: torch.Tensor | None = None,
                absorbed: bool = False) -> torch.Tensor:
        """x [T, H] at positions start..start+T-1 -> [T, H].

        cache: this layer's [max_len, r + dr] rows (MLACache.layer); rows start..start+T-1 are written,
        rows 0..start+T-1 are attended. Without a cache (start must be 0) only x itself is attended.
        """
        T = x.shape[0]
        pos = torch.arange(start, start + T, device=x.device)
        q_nope, q_pe = self.query(x, pos, start + T - 1)
        rows = self.compress(x, pos, start + T - 1)
        if cache is not None:
            cache[start:start + T] = rows.to(cache.dtype)
            rows = cache[: start + T].to(x.dtype)
        elif start:
            raise ValueError("MLA.forward: start > 0 needs the cache holding the earlier tokens")
        return self.o_proj(self.attend(q_nope, q_pe, rows, pos, absorbed))

    def _expanded(self, q_nope, q_pe, rows, mask):
        S = rows.shape[0]
        kv = self.kv_b_proj(rows[:, : self.r]).view(S, self.nh, self.dn + self.dv)
        k = torch.cat([kv[..., : self.dn], rows[:, None, self.r:].expand(S, self.nh, self.dr)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                           kv[..., self.dn:].transpose(0, 1), attn_mask=mask, scale=self.scale)
        return o.transpose(0, 1)

    def _absorbed(self, q_nope, q_pe, rows, mask):
        # batched matmuls over heads instead of einsum + SDPA: 2.8x less time for one decode token at the bench
        # model's shape (8 heads, r 512; 91 vs 258 us, one thread), same products.
        q = torch.cat([self.kv_b_proj.absorb_q(q_nope), q_pe.transpose(0, 1)], dim=-1)  # [nh, T, r+dr]
        s = torch.matmul(q, rows.T) * self.scale                                         # [nh, T, S]: one KV head
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s.float(), dim=-1).to(rows.dtype)
        return self.kv_b_proj.absorb_o(torch.matmul(p, rows[:, : self.r]))               # [T, nh, dv]
