"""MuonClip: Muon for the hidden matrices, AdamW for the rest, QK-Clip after every step (Kimi K2 report).

- Muon (torch.optim.Muon): momentum 0.95 with Nesterov, the update of each 2-D hidden matrix
  orthogonalized by 5 Newton-Schulz steps, then scaled by 0.2 * sqrt(max(A, B)) so its RMS matches
  AdamW's ("match_rms_adamw", Moonlight): one learning rate and weight decay serve both optimizers.
- AdamW: embeddings, lm_head and the norms (K2 and Moonlight keep these on AdamW).
- The routers' e_score_correction_bias is a buffer, not a parameter: it is moved by the aux-loss-free
  balancing rule (train/balance.py), never by a gradient.
- QK-Clip (train/qk_clip.py) after both updates, with each head's max logit from the step's forward
  (clip_source "forward", as the K2 report does) or re-measured on the updated weights ("after_step").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from train.model import Probe, TrainModel
from train.qk_clip import qk_clip_, qk_clip_model_

ADAMW_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
CLIP_SOURCES = ("forward", "after_step")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    tau: float | None = 100.0       # QK-Clip threshold; None = plain Muon (no clipping)
    clip_source: str = "forward"    # where S_h comes from (train/qk_clip.py): one of CLIP_SOURCES

    def __post_init__(self):
        if self.clip_source not in CLIP_SOURCES:
            raise ValueError(f"clip_source must be one of {', '.join(CLIP_SOURCES)}, got {self.clip_source!r}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"QK-Clip threshold tau must be > 0, got {self.tau}; K2 uses 100 "
                             "(or turn clipping off for plain Muon)")


def split_params(model: TrainModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(hidden matrices for Muon, the rest for AdamW)."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        (adamw if p.dim() != 2 or name in ADAMW_NAMES else muon).append(p)
    return muon, adamw


class MuonClip:
    """One optimizer object over a TrainModel.

    Example:
        >>> opt = MuonClip(model, OptimConfig(lr=2e-3, tau=100.0))
        >>> loss, probe = model.loss(batch); loss.backward()
        >>> gammas = opt.step(probe)          # Muon + AdamW, then QK-Clip; [layers] of [nh] factors
        >>> opt.zero_grad()
    """

    def __init__(self, model: TrainModel, cfg: OptimConfig):
        self.model, self.cfg = model, cfg
        muon, adamw = split_params(model)
        self.muon = torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                     nesterov=True, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adamw, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def set_lr(self, lr: float) -> None:
        for opt in (self.muon, self.adamw):
            for g in opt.param_groups:
                g["lr"] = lr

    def step(self, probe: Probe, ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Apply the gradients, then QK-Clip with the max logits the forward recorded (probe), or with
        those of the updated weights on ids [B, T] (clip_source "after_step").
        Returns each layer's [nh] gammas (all ones without clipping)."""
        self.muon.step()
        self.adamw.step()
        attns = self.model.attentions()
        if self.cfg.tau is None:
            return [torch.ones(a.nh) for a in attns]
        if self.cfg.clip_source == "forward":
            return [qk_clip_(a, m, self.cfg.tau) for a, m in zip(attns, probe.max_logits)]
        if ids is None:
            raise ValueError("clip_source 'after_step' needs the step's token ids: step(probe, ids)")
        return qk_clip_model_(self.model, ids, self.cfg.tau)

    def zero_grad(self) -> None:
        self.muon.zero_grad(set_to_none=True)
        self.adamw.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
