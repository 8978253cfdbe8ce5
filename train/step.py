"""One training step of a TrainModel, shared by the trainer and bench.muonclip:
forward (recording max logits and expert loads) -> backward -> aux-loss-free bias update of every router
-> MuonClip step (Muon + AdamW, then QK-Clip).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from train.balance import balance_bias_, imbalance
from train.model import TrainModel
from train.optim import MuonClip


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): the training default for autocast."""
    from cpu_experts.ir import cpu_features
    return bool({"avx512bf16", "amx-bf16"} & cpu_features())


@dataclass(frozen=True)
class Schedule:
    """The training run's shape; part of a run's identity."""
    steps: int = 4000
    batch: int = 16
    seq: int = 256
    warmup: int = 100
    min_lr_ratio: float = 0.1      # cosine decay from the peak to this share of it
    balance_u: float = 1e-3        # bias update speed (DeepSeek-V3's 0.001)
    seed: int = 0
    # bf16 autocast of the matmuls (weights, gradients and optimizer state stay float32): 1.7x faster
    # steps on an AVX512-BF16 CPU (1.64 vs 2.81 s for 16 x 256 tokens of the tiny model, one thread); on a
    # CPU without it torch emulates bf16, ~3x slower than float32, so the default follows the CPU
    bf16: bool = field(default_factory=cpu_has_bf16)

    def __post_init__(self):
        for name in ("steps", "batch", "seq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def lr_scale(self, step: int) -> float:
        """Multiplier of the peak learning rate at `step` (0-based): linear warmup, then cosine."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@dataclass(frozen=True)
class StepStats:
    step: int
    loss: float
    lr: float
    max_logit: float              # largest pre-softmax logit of any head in this step's forward
    max_logits: list[float]       # per layer, the largest over its heads
    clipped_heads: int            # heads QK-Clip rescaled after this step
    imbalance: float              # mean over MoE layers of max/mean expert load (1.0 = balanced)


def train_step(model: TrainModel, opt: MuonClip, batch: torch.Tensor, step: int, lr: float,
               balance_u: float, bf16: bool = False) -> StepStats:
    """One step on batch [B, T+1]; returns what it measured (before the update)."""
    opt.set_lr(lr)
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, probe = model.loss(batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr (now {lr:.2e})")
    loss.backward()
    loss = loss.detach()
    routers = model.routers()
    for i, load in probe.loads.items():      # before the clip: an after-step clip measures the final model
        balance_bias_(routers[i], load, balance_u)
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        gammas = opt.step(probe, batch[:, :-1])
    opt.zero_grad()
    per_layer = [float(m.max()) for m in probe.max_logits]
    loads = [imbalance(x) for x in probe.loads.values()]
    return StepStats(step, loss.item(), lr, max(per_layer), per_layer, int(sum((g < 1).sum() for g in gammas)),
                     sum(loads) / len(loads) if loads else 1.0)


@torch.no_grad()
def evaluate(model: TrainModel, batches: list[torch.Tensor]) -> float:
    """Mean next-token loss over fixed batches."""
    return sum(float(model.loss(b)[0]) for b in batches) / len(batches)
