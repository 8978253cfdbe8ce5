"""QK-Clip for MLA, as the Kimi K2 report specifies it.

nh = heads, dn/dr/dv = nope/rope/value head dims, r = kv_lora_rank.

After an optimizer step, every head h whose largest pre-softmax logit S_h (softmax scale included, taken
over the step's batch by the forward) exceeds tau gets gamma_h = tau / S_h, and its query and key weights
are rescaled in place so that its logits scale by exactly gamma_h:
    q_nope rows of head h (q_b_proj, or q_proj without query compression)   x sqrt(gamma_h)
    k_nope rows of head h (the K half of kv_b_proj)                         x sqrt(gamma_h)
    q_rope rows of head h                                                   x gamma_h
The rope key (kv_a_proj_with_mqa's last dr rows) is shared by all heads, so it is never touched: scaling it
would clip every head. Value rows, o_proj and heads at or under tau are left bit-identical.

Where S_h comes from: the K2 report takes it from the step's own forward, i.e. from the weights before the
update (qk_clip_ with Probe.max_logits; MuonClip's default). The clipped weights then hold the batch's
logits at tau times one update's growth: at a high learning rate that overshoots (bench/muonclip.py
measures it). qk_clip_model_ takes S_h from the updated weights instead, one extra no-grad forward, so
that afterwards every head's max logit on the batch is at most tau.
"""
from __future__ import annotations

import torch

from gpu_attn import MLA

from train.model import TrainModel, attend


@torch.no_grad()
def qk_clip_(attn: MLA, max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Clip the heads of `attn` whose max logit exceeds tau, in place.

    Args:
        attn: a gpu_attn.MLA.
        max_logits: [nh] S_h, each head's largest pre-softmax logit over the batch (TrainModel's Probe).
        tau: the cap, > 0 (K2: 100).
    Returns:
        [nh] float32 gamma_h: tau / S_h for clipped heads, exactly 1.0 for the others.
    """
    if not tau > 0:
        raise ValueError(f"QK-Clip threshold tau must be > 0, got {tau}; K2 uses 100")
    if max_logits.shape != (attn.nh,):
        raise ValueError(f"max_logits must have shape [{attn.nh}] (one per head), got {list(max_logits.shape)}")
    s = max_logits.detach().float().cpu()
    gamma = torch.where(s > tau, tau / s, torch.ones_like(s))                           # [nh]
    clipped = (gamma < 1).nonzero().flatten().tolist()
    if not clipped:
        return gamma
    # MLA has q_proj without query compression, q_a_proj/q_b_proj with it (as gpu_attn.MLA.query reads it)
    wq = (attn.q_proj if hasattr(attn, "q_proj") else attn.q_b_proj).weight
    q = wq.view(attn.nh, attn.dn + attn.dr, -1)                                           # [nh, dn+dr, in]
    k = attn.kv_b_proj.weight.view(attn.nh, attn.dn + attn.dv, attn.r)                  # [nh, dn+dv, r]
    for h in clipped:
        g = gamma[h].item()
        q[h, : attn.dn] *= g ** 0.5
        q[h, attn.dn:] *= g
        k[h, : attn.dn] *= g ** 0.5
    return gamma


@torch.no_grad()
def qk_clip_model_(model: TrainModel, ids: torch.Tensor, tau: float) -> list[torch.Tensor]:
    """QK-Clip every layer of model with max logits of its current weights on ids [B, T].

    Layer by layer: each layer's heads are measured on the input the (already clipped) layers below now
    give it, clipped, and the layer is rerun with its clipped weights, so on ids every head's max logit
    ends at most tau (to float32 rounding). One no-grad forward with attention computed twice, in float32
    even under bf16 autocast: bf16 copies of the clipped weights would move the logits by up to 0.4 %.
    Returns each layer's [nh] gammas.
    """
    with torch.autocast(ids.device.type, enabled=False):
        h = model.model.embed_tokens(ids)
        gammas = []
        for layer in model.model.layers:
            _, s = attend(layer.self_attn, layer.input_layernorm(h))
            gammas.append(qk_clip_(layer.self_attn, s, tau))
            h = layer(h)[0]
    return gammas
