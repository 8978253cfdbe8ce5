"""Which kernels run a weight: the per-format table of kernel modules, and choose_path.

Paths:
  "int4-int8": int4 weights x int8 activations, vpdpbusd IR kernels (cpu_experts/int4_vnni.py);
  "avx512":    fp8 / bf16 weights x float32 activations, IR kernels (fp8_avx512.py, bf16_avx512.py);
  "plain":     the portable Numba kernels, float32 activations (int4.py, fp8.py, bf16.py): the fallback
               where the CPU lacks ir.REQUIRED or an input size is not a multiple of the fast kernels' unit.
Every kernel module has the expert contract of cpu_experts/int4.py (gateup / down over a LayerStore-like
buffer); the dense linears (cpu_experts/linear.py) run the same `down` drivers.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from quant.formats import FORMAT_NAMES

from cpu_experts import bf16, bf16_avx512, fp8, fp8_avx512, int4, int4_vnni, ir

ACTIVATIONS = ("auto", "float", "int8")
KERNEL_CHOICES = ("auto", "plain")


@dataclass(frozen=True)
class FormatKernels:
    plain: ModuleType       # float activations, any shape, any CPU
    fast: ModuleType        # IR kernels (needs ir.supported())
    fast_path: str          # the fast path's name
    unit: int               # the fast kernels need every input size to be a multiple of this: int4 128 (one
    #                         64-byte chunk of codes, and prepare_int8's activation block); fp8 64 (one chunk,
    #                         ir.fp8_order's permutation); bf16 32 (one chunk)


KERNELS = {"int4": FormatKernels(int4, int4_vnni, "int4-int8", 128),
           "fp8": FormatKernels(fp8, fp8_avx512, "avx512", 64),
           "bf16": FormatKernels(bf16, bf16_avx512, "avx512", 32)}
assert tuple(KERNELS) == FORMAT_NAMES, "one kernel entry per format of quant/formats.py"


def choose_path(fmt: str, inputs: tuple[int, ...], activations: str = "auto", kernels: str = "auto") -> str:
    """The path for weights in `fmt` whose products have these input sizes (an expert: (hidden, inter)).

    "auto" takes the fast path when the CPU has what ir.REQUIRED lists and every input size is a multiple of
    the format's unit, else plain. activations (int4 only): "auto" = int8 when fast, "float" = the exact
    plain path, "int8" = require the fast path (ValueError when it cannot run).
    """
    if activations not in ACTIVATIONS or kernels not in KERNEL_CHOICES:
        raise ValueError(f"activations={activations!r} (use one of {ACTIVATIONS}), kernels={kernels!r} "
                         f"(use one of {KERNEL_CHOICES})")
    k = KERNELS[fmt]
    fits = kernels == "auto" and ir.supported() and all(n % k.unit == 0 for n in inputs)
    if activations == "int8" and (fmt != "int4" or not fits):
        raise ValueError(f"activations='int8' needs int4 weights, an AVX-512 VNNI CPU ({', '.join(ir.REQUIRED)}) "
                         f"and input sizes that are multiples of 128; got fmt={fmt}, inputs {inputs}, "
                         f"cpu ok={ir.supported()}; use activations='auto' or 'float'")
    if fmt == "int4" and activations == "float":
        return "plain"
    return k.fast_path if fits else "plain"
