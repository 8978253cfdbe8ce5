"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2, used by K2): after each step, every MoE layer's
e_score_correction_bias moves by u toward balanced load: down for experts that got more than the mean
number of tokens, up for those that got fewer. The bias only chooses experts (gpu_attn/router.py), so
balancing never changes the weights the experts' outputs are mixed with.
"""
from __future__ import annotations

import torch

from gpu_attn import Router


@torch.no_grad()
def balance_bias_(router: Router, load: torch.Tensor, u: float) -> None:
    """bias += u * sign(mean(load) - load), in place.

    Args:
        router: the layer's gpu_attn.Router.
        load: [E] tokens routed to each expert in this step (TrainModel's Probe.loads).
        u: the bias update speed (DeepSeek-V3: 0.001).
    """
    if load.shape != router.e_score_correction_bias.shape:
        raise ValueError(f"load must have shape {list(router.e_score_correction_bias.shape)} (one count per "
                         f"expert), got {list(load.shape)}")
    load = load.float()
    router.e_score_correction_bias.add_(u * torch.sign(load.mean() - load).to(router.e_score_correction_bias))


def imbalance(load: torch.Tensor) -> float:
    """max / mean tokens per expert: 1.0 is perfectly balanced."""
    load = load.float()
    return float(load.max() / load.mean().clamp(min=1e-9))
