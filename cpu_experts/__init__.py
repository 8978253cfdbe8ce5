"""CPU kernels: the routed experts (expert store, INT4 / FP8 / BF16 kernels, the CPU MoE forward) and, on
the same kernels, the dense layers of a CPU-only run (PackedLinear, PackedMLP), all on one RowPool.

numpy + Numba only: this package never imports torch or hybrid (it may import quant).
"""
from quant.store import LayerStore, StoreSpec
from cpu_experts.linear import PackedLinear, PackedMLP
from cpu_experts.moe import CpuMoE, Ticket
from cpu_experts.pool import RowPool

__all__ = ["LayerStore", "StoreSpec", "CpuMoE", "Ticket", "PackedLinear", "PackedMLP", "RowPool"]
