"""CPU routed experts: the expert store, Numba kernels (INT4 / FP8 / BF16) and the CPU MoE forward.

numpy + Numba only: this package never imports torch or hybrid (it may import quant).
"""
from quant.store import LayerStore, StoreSpec
from cpu_experts.moe import CpuMoE, Ticket

__all__ = ["LayerStore", "StoreSpec", "CpuMoE", "Ticket"]
