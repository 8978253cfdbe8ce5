"""Engine options shared by `hybrid generate` and `hybrid serve`: one definition, one load."""
from __future__ import annotations

import argparse
from pathlib import Path

from hybrid.core.options import EXPERT_CHOICES, PREFETCH_CHOICES


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model folder (default: the bundled tiny model, made on first use)")
    p.add_argument("--experts", default="auto", choices=EXPERT_CHOICES,
                   help="routed-expert format on the CPU (auto = the checkpoint's own; torch = reference)")
    p.add_argument("--gpu-expert-budget", default="0",
                   help="device hot-set size: bytes, e.g. 2GiB, or a share of all routed experts, e.g. 25%%")
    p.add_argument("--prefetch", default="auto", choices=PREFETCH_CHOICES,
                   help="hot-set policy (auto = router when the budget is non-zero)")
    p.add_argument("--placement", type=Path, help="placement.json for --prefetch static (hybrid profile writes one)")
    p.add_argument("--transfer-budget", default="auto",
                   help="bytes per token the hot set may copy to the device (auto: 1/16 expert per layer)")
    p.add_argument("--context", type=int, help="tokens of KV cache the placement reserves")
    p.add_argument("--gpu-memory", help="device memory the placement may use, e.g. 20GiB (default: what is free)")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", help="device compute dtype: auto | float32 | bfloat16")


def load_engine(a):
    """hybrid.load with the options add_engine_options defined; the tiny model when --model is absent."""
    from hybrid.runtime.loader import load
    from hybrid.models.tiny import ensure_default_tiny
    budget = int(a.gpu_expert_budget) if str(a.gpu_expert_budget).isdigit() else a.gpu_expert_budget
    return load(a.model or ensure_default_tiny(), device=a.device, experts=a.experts,
                       gpu_expert_budget=budget, prefetch=a.prefetch, threads=a.threads, dtype=a.dtype,
                       placement=a.placement, transfer_budget=a.transfer_budget, context=a.context,
                       gpu_memory=a.gpu_memory)
