"""RuntimeOptions: every knob of hybrid.load in one frozen dataclass, checked before any I/O."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXPERT_FORMATS = ("int4", "fp8", "bf16")
EXPERT_CHOICES = ("auto", *EXPERT_FORMATS, "torch")
PREFETCH_CHOICES = ("auto", "off", "static", "lru", "lfu", "router")


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"                  # auto | cpu | cuda[:N]
    dtype: str = "auto"                   # device compute dtype; auto = bf16 on CUDA, f32 on CPU
    experts: str = "auto"                 # routed-expert format on the CPU (auto = the checkpoint's own)
    gpu_expert_budget: int | str = 0      # bytes, "2GiB", or a share of all routed experts, "25%"
    prefetch: str = "auto"                # hot-set policy; auto = router when the budget is non-zero
    placement: str | Path | None = None   # placement.json for prefetch="static" (hybrid profile writes one)
    transfer_budget: int | str = "auto"   # bytes per token the hot set may copy; auto = 1/16 expert/layer
    threads: int | None = None            # CPU threads (default: physical cores)
    context: int | None = None            # tokens the placement reserves KV cache for (default <= 32768)
    gpu_memory: int | str | None = None   # device bytes the plan may use (default: what is free)
    activations: str = "auto"             # INT4 kernels: auto = int8 activations (VNNI, ~1e-2 of max|y|); float

    def __post_init__(self):
        if self.experts not in EXPERT_CHOICES:
            raise ValueError(f"experts={self.experts!r} is not one of {', '.join(EXPERT_CHOICES)}")
        if self.prefetch not in PREFETCH_CHOICES:
            raise ValueError(f"prefetch={self.prefetch!r} is not one of {', '.join(PREFETCH_CHOICES)}")
        if self.prefetch == "static" and self.placement is None:
            raise ValueError("prefetch='static' needs a placement file (placement=..., --placement FILE); "
                             "`hybrid profile` writes one")
        if self.activations not in ("auto", "float"):
            raise ValueError(f"activations={self.activations!r}: use 'auto' (int8 activations for INT4) or 'float'")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
        if self.context is not None and (not isinstance(self.context, int) or self.context < 1):
            raise ValueError(f"context must be a positive int, got {self.context!r}")
