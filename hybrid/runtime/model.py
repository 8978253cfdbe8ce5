"""The decoder as torch modules whose parameter names equal the checkpoint's tensor names.

Routed experts are not parameters here: each MoE layer calls the expert backend it was built with
(hybrid/runtime/experts.py). The routers are built first and given to the model (the backend's look-ahead
uses them too). Modules are built on the meta device and filled by the loader, so no memory is spent on
weights that are about to be replaced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gpu_attn import MLA, MLP, RMSNorm, Router, YarnRope
from gpu_attn.rope import softmax_scale
from hybrid.core.config import ModelConfig
from hybrid.runtime.experts import ExpertBackend
from hybrid.runtime.moe import MoE, RouteObserver

# T = tokens, H = hidden, V = vocab


@dataclass(frozen=True)
class Step:
    """How one forward pass runs besides its tokens: the phase, the first position, the cache, the form of
    attention (prefill: expanded; decode: absorbed over the compressed cache)."""
    phase: str                    # "prefill" | "decode"
    start: int = 0                # position of the first token
    cache: object = None          # MLACache or None (attend to these tokens only)
    absorbed: bool = False        # MLA's absorbed form (decode) instead of the expanded one (prefill)


def build_routers(cfg: ModelConfig) -> dict[int, Router]:
    """One Router per MoE layer (on the current default device; the loader builds them on meta)."""
    return {L: Router(cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group,
                      cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor) for L in cfg.moe_layers}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: YarnRope, mlp: nn.Module):
        super().__init__()
        r = cfg.rope
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                             cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                             softmax_scale(cfg.qk_head_dim, r.type, r.factor, r.mscale_all_dim), rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp
        self._moe = isinstance(mlp, MoE)

    def forward(self, h: torch.Tensor, step: Step, cache_rows) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), step.start, cache_rows, step.absorbed)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, step.phase) if self._moe else self.mlp(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: YarnRope, mlps: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rope, mlps[i]) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class K2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: YarnRope, routers: dict[int, Router], experts: ExpertBackend,
                 on_route: RouteObserver | None = None):
        """routers: MoE layer -> Router (build_routers); experts: the routed-expert backend every MoE layer
        calls; on_route: the routing observer (the engine's RouteListeners)."""
        super().__init__()
        mlps = [MoE(L, routers[L], MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts),
                    experts, on_route) if cfg.is_moe_layer(L) else MLP(cfg.hidden_size, cfg.intermediate_size)
                for L in range(cfg.num_hidden_layers)]
        self.model = Backbone(cfg, rope, mlps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        """ids [T] at positions step.start.. -> final-normed hidden [T, H]."""
        h = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, step, None if step.cache is None else step.cache.layer(i))
        return self.model.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:   # [T, H] -> [T, V] float32
        return self.lm_head(h).float()


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` (dotted, the checkpoint's name) with `value`."""
    path, leaf = name.rsplit(".", 1)
    mod = root.get_submodule(path)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise KeyError(name)
