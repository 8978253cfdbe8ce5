"""Torch modules for the device side of K2 / DeepSeek-V3: RMSNorm, YaRN RoPE, MLA, router, SwiGLU MLP.

Device-agnostic: the same code runs on CUDA and on the CPU stand-in. Never imports cpu_experts or hybrid;
modules take explicit sizes, and their parameter names equal the checkpoint's tensor names.
"""
from .mla import MLA, MLACache
from .mlp import MLP
from .norm import RMSNorm
from .rope import YarnRope
from .router import Router

__all__ = ["MLA", "MLACache", "MLP", "RMSNorm", "YarnRope", "Router"]
