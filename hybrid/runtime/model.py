"""The decoder as torch modules whose parameter names equal the checkpoint's tensor names.

A forward step runs a Batch (hybrid/runtime/batch.py): the tokens of several sequences at their own
positions, each attending over its own blocks of the paged compressed cache (KVPool).

Routed experts are not parameters here: each MoE layer calls the expert backend it was built with
(hybrid/runtime/experts.py). The routers are built first and given to the model (the backend's look-ahead
uses them too). Modules are built on the meta device and filled by the loader, so no memory is spent on
weights that are about to be replaced.

The model is built in parts, one per device of its DeviceMap (hybrid/runtime/device_map.py): each part's
layers with that device's rope tables and dense-module factory; the embeddings with the first part, the final
norm and lm_head with the last. One device is one part.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gpu_attn import MLA, RMSNorm, Router, YarnRope
from gpu_attn.rope import softmax_scale
from hybrid.core.config import ModelConfig
from hybrid.runtime.batch import Batch
from hybrid.runtime.dense import DenseModules
from hybrid.runtime.device_map import DeviceMap, DeviceSpan, KVPools
from hybrid.runtime.experts import ExpertBackend
from hybrid.runtime.moe import MoE, RouteObserver

# T = tokens, H = hidden, V = vocab


def paged_attention(attn: MLA, x: torch.Tensor, batch: Batch, kv: torch.Tensor) -> torch.Tensor:
    """MLA over the paged cache: x [T, H] -> [T, H]. Writes the step's cache rows into kv [slots, D], then each
    segment attends over its own context rows (a view when its blocks are consecutive)."""
    q_nope, q_pe = attn.query(x, batch.positions, batch.max_pos)
    kv[batch.slots] = attn.compress(x, batch.positions, batch.max_pos).to(kv.dtype)
    outs = []
    for seg in batch.segments:
        sl = slice(seg.start, seg.start + seg.length)
        outs.append(attn.attend(q_nope[sl], q_pe[sl], seg.rows(kv).to(x.dtype), batch.positions[sl], seg.absorbed))
    return attn.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))


def build_routers(cfg: ModelConfig) -> dict[int, Router]:
    """One Router per MoE layer (on the current default device; the loader builds them on meta)."""
    return {L: Router(cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group,
                      cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor) for L in cfg.moe_layers}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: YarnRope, mlp: nn.Module, dense: DenseModules):
        super().__init__()
        r = cfg.rope
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                             cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                             softmax_scale(cfg.qk_head_dim, r.type, r.factor, r.mscale_all_dim), rope,
                             linear=dense.linear, kv_up=dense.kv_up)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp
        self._moe = isinstance(mlp, MoE)

    def forward(self, h: torch.Tensor, batch: Batch, kv: torch.Tensor) -> torch.Tensor:
        h = h + paged_attention(self.self_attn, self.input_layernorm(h), batch, kv)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, batch.phase) if self._moe else self.mlp(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass(frozen=True)
class DevicePart:
    """What the model builds on one device: its span of layers, its rope tables (on that device), its
    dense-module factory (hybrid/runtime/dense.py: a DeviceDense keeps one dequantization buffer per device)."""
    span: DeviceSpan
    rope: YarnRope
    dense: DenseModules = DenseModules()


class K2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: Sequence[DevicePart], routers: dict[int, Router],
                 experts: ExpertBackend, on_route: RouteObserver | None = None):
        """parts: one per device, in layer order (DevicePart; one for a single device); routers: MoE layer ->
        Router (build_routers); experts: the routed-expert backend every MoE layer calls; on_route: the routing
        observer (the engine's RouteListeners)."""
        super().__init__()
        part = {L: p for p in parts for L in p.span.layers}
        layers = [DecoderLayer(cfg, L, part[L].rope, self._mlp(cfg, L, part[L].dense, routers, experts, on_route),
                               part[L].dense) for L in range(cfg.num_hidden_layers)]
        self.model = Backbone(cfg, layers)
        self.lm_head = parts[-1].dense.linear(cfg.hidden_size, cfg.vocab_size)
        self.devices = DeviceMap(tuple(p.span for p in parts))
        # what hidden() runs: per part, the device to move the hidden state to (None: the first) and its layers
        self._stages = tuple((p.span.device if k else None, tuple((L, layers[L]) for L in p.span.layers))
                             for k, p in enumerate(parts))

    @staticmethod
    def _mlp(cfg: ModelConfig, L: int, dense: DenseModules, routers: dict[int, Router], experts: ExpertBackend,
             on_route: RouteObserver | None) -> nn.Module:
        if not cfg.is_moe_layer(L):
            return dense.mlp(cfg.hidden_size, cfg.intermediate_size)
        shared = dense.mlp(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        return MoE(L, routers[L], shared, experts, on_route)

    def hidden(self, batch: Batch, kv: KVPools) -> torch.Tensor:
        """The batch's tokens -> final-normed hidden [T, H] on the last device; their cache rows are written into
        kv. At each further device of the map the hidden state and the step's index tensors move there."""
        h = self.model.embed_tokens(batch.ids).to(self.model.norm.weight.dtype)   # the table may stay bf16
        for move, layers in self._stages:
            if move is not None:
                h, batch = h.to(move), batch.to(move)
            for i, layer in layers:
                h = layer(h, batch, kv.layer(i))
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
