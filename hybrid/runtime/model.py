"""The decoder as torch modules whose parameter names equal the checkpoint's tensor names.

Routed experts are not parameters here: each MoE layer calls an expert backend (hybrid/experts.py), which
may run them on the CPU kernels or on the device. Modules are built on the meta device and filled by the
loader, so no memory is spent on weights that are about to be replaced.
"""
from __future__ import annotations

import torch
from torch import nn

from gpu_attn import MLA, MLP, RMSNorm, Router, YarnRope
from gpu_attn.rope import softmax_scale

from hybrid.core.config import ModelConfig
from hybrid.runtime.moe import MoE

# T = tokens, H = hidden, V = vocab


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: YarnRope):
        super().__init__()
        r = cfg.rope
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                             cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                             softmax_scale(cfg.qk_head_dim, r.type, r.factor, r.mscale_all_dim), rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer):
            router = Router(cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group,
                            cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
            shared = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            self.mlp = MoE(layer, router, shared)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, start, cache, absorbed):
        h = h + self.self_attn(self.input_layernorm(h), start, cache, absorbed)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: YarnRope):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rope) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class K2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: YarnRope):
        super().__init__()
        self.model = Backbone(cfg, rope)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden(self, ids: torch.Tensor, start: int = 0, cache=None, absorbed: bool = False) -> torch.Tensor:
        """ids [T] at positions start.. -> final-normed hidden [T, H]. cache: MLACache or None."""
        h = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, start, None if cache is None else cache.layer(i), absorbed)
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
