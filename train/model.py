"""The K2 architecture as a trainable torch model, built from gpu_attn's modules.

B = sequences, T = tokens per sequence, N = B*T, H = hidden, E = routed experts, k = experts per token,
nh = heads, V = vocab.

The runtime's model (hybrid/runtime/model.py) is inference-only: built on the meta device, no gradients,
routed experts outside the module tree. This one reuses its decoder layer's modules (gpu_attn's MLA, MLP,
RMSNorm, Router) but keeps every tensor as a parameter, the routed experts included, with the checkpoint's
own names (model.layers.L.mlp.experts.E.gate_proj.weight ...), so `state_dict()` is the checkpoint's
tensor table and a saved model loads in `hybrid.load` unchanged. Attention runs MLA's own projections
(MLA.query / MLA.compress, the inference code) on a batch and attends explicitly, because QK-Clip needs
each head's largest pre-softmax logit, which scaled_dot_product_attention does not expose.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpu_attn import MLA, MLP, RMSNorm, Router, YarnRope

from hybrid.core.config import ModelConfig
from hybrid.runtime.dense import DenseModules
from hybrid.runtime.model import DecoderLayer, build_routers


@dataclass
class Probe:
    """What one forward saw, for QK-Clip and load balancing (detached).

    max_logits: per layer, [nh] the largest pre-softmax logit (softmax scale included) of each head
        over the batch. loads: per MoE layer index, [E] tokens routed to each expert.
    """
    max_logits: list[torch.Tensor]
    loads: dict[int, torch.Tensor]


def build_rope(cfg: ModelConfig, max_positions: int = 4096) -> YarnRope:
    r = cfg.rope
    return YarnRope(cfg.qk_rope_head_dim, r.theta, r.type, r.factor, r.original_max_position_embeddings,
                    r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim,
                    max_positions=min(cfg.max_position_embeddings, max_positions))


def attend(attn: MLA, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal MLA over a batch: x [B, T, H] -> (out [B, T, H], max pre-softmax logit per head [nh]).

    Same math as MLA's prefill form (expanded K/V), each sequence at positions 0..T-1.
    """
    B, T, H = x.shape
    flat = x.reshape(B * T, H)
    pos = torch.arange(T, device=x.device).repeat(B)                                     # [N]
    q_nope, q_pe = attn.query(flat, pos)                                                 # [N,nh,dn], [N,nh,dr]
    rows = attn.compress(flat, pos)                                                      # [N, r+dr]
    kv = attn.kv_b_proj(rows[:, : attn.r]).float().view(B, T, attn.nh, attn.dn + attn.dv)
    k_pe = rows[:, attn.r:].float().view(B, T, attn.dr)
    # logits, softmax and the weighted sum in float32 even under bf16 autocast: QK-Clip reads the max
    # logit (bf16 would be 0.4 % off), and at T = 256 this is ~3 % of the step's FLOPs
    with torch.autocast(x.device.type, enabled=False):
        logits = (torch.einsum("bthd,bshd->bhts", q_nope.float().view(B, T, attn.nh, attn.dn), kv[..., : attn.dn])
                  + torch.einsum("bthd,bsd->bhts", q_pe.float().view(B, T, attn.nh, attn.dr), k_pe)) * attn.scale
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()              # [T, S]
        logits = logits.masked_fill(~causal, float("-inf"))                              # [B, nh, T, S]
        max_logits = logits.detach().amax(dim=(0, 2, 3))                                 # [nh]
        o = torch.einsum("bhts,bshd->bthd", logits.softmax(-1), kv[..., attn.dn:])        # [B, T, nh, dv]
    return attn.o_proj(o.reshape(B, T, attn.nh * attn.dv)), max_logits


class TrainMoE(nn.Module):
    """Router + shared expert + routed experts as parameters; differentiable through the chosen experts'
    (unbiased, renormalized, scaled) router weights, as K2 trains them."""

    def __init__(self, cfg: ModelConfig, gate: Router, shared_experts: MLP):
        super().__init__()
        self.gate = gate
        self.shared_experts = shared_experts
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, H] -> (out [N, H], load [E] tokens per expert)."""
        ids, w = self.gate(h)                                                            # [N, k] each
        k = ids.shape[1]
        flat = ids.flatten()                                                             # [N*k]
        load = torch.bincount(flat, minlength=len(self.experts))                         # [E]
        order = flat.argsort(stable=True)
        token = order // k
        weight = w.flatten()[order].to(h.dtype)[:, None]                                 # [N*k, 1]
        out = self.shared_experts(h).to(h.dtype)       # float32 sums even when the experts run in bf16
        start = 0
        for e, n in enumerate(load.tolist()):
            if n:
                rows = token[start:start + n]
                out = out.index_add(0, rows, (self.experts[e](h[rows]) * weight[start:start + n]).to(h.dtype))
                start += n
        return out, load


class TrainLayer(DecoderLayer):
    """The runtime's decoder layer (same modules, same names) with the routed experts inside the module
    tree (TrainMoE instead of the runtime's MoE, whose experts live in a backend) and a batched forward."""

    def __init__(self, cfg: ModelConfig, layer: int, rope: YarnRope):
        dense = DenseModules()                  # float modules: every weight a parameter
        self_moe = cfg.is_moe_layer(layer)
        if self_moe:
            mlp = TrainMoE(cfg, build_routers(cfg)[layer],
                           dense.mlp(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts))
        else:
            mlp = dense.mlp(cfg.hidden_size, cfg.intermediate_size)
        super().__init__(cfg, layer, rope, mlp, dense)
        self.is_moe = self_moe

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """h [B, T, H] -> (h [B, T, H], max logits [nh], expert load [E] or None)."""
        a, max_logits = attend(self.self_attn, self.input_layernorm(h))
        h = h + a
        x = self.post_attention_layernorm(h)
        if not self.is_moe:
            return h + self.mlp(x), max_logits, None
        y, load = self.mlp(x.reshape(-1, x.shape[-1]))
        return h + y.view_as(h), max_logits, load


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: YarnRope):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TrainLayer(cfg, i, rope) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TrainModel(nn.Module):
    """ids [B, T] -> (logits [B, T, V] float32, Probe). Parameter names = checkpoint tensor names."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, build_rope(cfg))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for p in self.parameters():
            p.requires_grad_(True)        # gpu_attn's norms and router are built frozen for inference
        init_weights_(self, seed)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, Probe]:
        h = self.model.embed_tokens(ids)
        probe = Probe([], {})
        for i, layer in enumerate(self.model.layers):
            h, m, load = layer(h)
            probe.max_logits.append(m)
            if load is not None:
                probe.loads[i] = load
        return self.lm_head(self.model.norm(h)).float(), probe

    def loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, Probe]:
        """Next-token cross-entropy of ids [B, T+1] (mean over B*T predictions), and the Probe."""
        logits, probe = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)), probe

    def attentions(self) -> list[MLA]:
        return [layer.self_attn for layer in self.model.layers]

    def routers(self) -> dict[int, Router]:
        return {i: layer.mlp.gate for i, layer in enumerate(self.model.layers) if layer.is_moe}


def init_weights_(model: TrainModel, seed: int) -> None:
    """Deterministic init from `seed`: linears N(0, 1/fan_in) (activations stay O(1)); the projections
    that write into the residual stream (o_proj, down_proj) start at zero, so every layer starts as the
    identity (as modded-nanogpt does for Muon); embeddings N(0, 1); norms 1; router biases 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        for router in model.routers().values():
            router.e_score_correction_bias.zero_()
