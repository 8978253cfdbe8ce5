"""Building the routed-expert backend from the expert stores, the options and the placement plan.

    torch        -> TorchExperts: every expert dequantized on the device (the reference path)
    int4/fp8/bf16, no hot set -> CpuExperts over one LayerStore per MoE layer
    int4/fp8/bf16 + hot set   -> HybridExperts: a policy per layer picks device copies (kept packed or
                                 dequantized, as the plan says), the CPU does the rest
"""
from __future__ import annotations

import torch

from gpu_attn import Router
from hybrid.core.config import ModelConfig
from hybrid.core.options import RuntimeOptions
from hybrid.core.placement import PlacementPlan
from hybrid.core.policies import make_policy
from hybrid.core.progress import bar
from hybrid.core.weights import expert_names, expert_shapes
from hybrid.runtime.device_map import DeviceMap
from hybrid.runtime.experts import CpuExperts, ExpertBackend, TorchExperts
from hybrid.runtime.hotset import HybridExperts


def build_torch_experts(cfg: ModelConfig, ckpt, devices: DeviceMap, dt: torch.dtype, stores=None) -> TorchExperts:
    """Every routed expert dequantized on its layer's device: from the checkpoint, or from a converted store."""
    shapes = expert_shapes(cfg)
    weights = {}
    for layer in cfg.moe_layers:
        dev = devices.device_of(layer)
        mats = [[], [], []]
        for e in range(cfg.n_routed_experts):
            if stores is not None:
                got = [torch.from_numpy(m) for m in stores[layer].dequantize(e)]
            else:
                got = [ckpt.get(n, dtype=torch.float32, expect_shape=s) for n, s in zip(expert_names(layer, e), shapes)]
            for k, w in enumerate(got):
                mats[k].append(w.to(dev, dt))
        weights[layer] = tuple(torch.stack(m) for m in mats)
    return TorchExperts(weights)


def build_stores(cfg: ModelConfig, ckpt, fmt: str) -> dict:
    """One in-memory LayerStore per MoE layer, converted from the checkpoint the way `hybrid-quant convert`
    converts it (FP8 -> fp8 keeps the released bytes)."""
    from quant.convert import ModelShape, expert_source
    from quant.store import LayerStore, StoreSpec
    spec = StoreSpec(fmt=fmt, hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size)
    source = expert_source(ckpt, ModelShape(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
                                            tuple(cfg.moe_layers), cfg.quantization_config))
    with bar(len(cfg.moe_layers) * cfg.n_routed_experts, "load experts", "expert") as progress:
        def read(layer: int, e: int) -> dict:
            progress.update()
            return source.expert(layer, e)
        return {layer: LayerStore.build(spec, cfg.n_routed_experts, lambda e, L=layer: read(L, e))
                for layer in cfg.moe_layers}


def build_cpu_backend(cfg: ModelConfig, stores: dict, opts: RuntimeOptions, plan: PlacementPlan,
                      routers: dict[int, Router], devices: DeviceMap, dt: torch.dtype, pool,
                      placement: dict | None = None) -> ExpertBackend:
    """CPU kernels over `stores` on `pool` (a cpu_experts.RowPool), with a hot set in front when the plan has
    room for one (on each device of the map, for its layers). On a CPU device they run synchronously
    (scheduled between the dense layers' turns on the same threads, not overlapped with them).

    placement: {layer: [expert ids]} (read_placement) for the static policy; ignored by the others.
    routers: the model's routers (look-ahead hints for the router policy)."""
    from cpu_experts import CpuMoE
    cpu = CpuExperts(CpuMoE(stores, activations=opts.activations, pool=pool), synchronous=devices.first.type == "cpu")
    policy_name = opts.hot_set_policy
    if policy_name is None or plan.experts_per_layer == 0 and policy_name != "static":
        return cpu
    per_token = opts.transfer_budget.copies_per_layer(plan.expert_device_bytes, plan.moe_layers)
    placement = placement if policy_name == "static" and placement else {}
    cap = plan.experts_per_layer
    policies = {L: make_policy(policy_name, cfg.n_routed_experts, cap, per_token, placement.get(L, [])[:cap])
                for L in cfg.moe_layers}
    return HybridExperts(cpu, stores, policies, devices, dt, routers, plan.hot_set_format)

