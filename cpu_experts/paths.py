"""Which kernels run a weight: the instruction set the IR kernels use (active_isa), the per-format table of
kernel modules, and choose_path.

Instruction sets (cpu_experts/ir.py ISA_FEATURES; the CPU features each needs):
  "avx512": avx512f, avx512bw, avx512vl, avx512vnni, avx512vbmi, fma (Ice Lake / Sapphire Rapids, Zen 4+);
  "avx2":   avx2, fma, f16c (Haswell and later, Zen 1-3: EPYC Naples / Rome / Milan);
  "plain":  any CPU: the portable Numba kernels, 35-100x slower than the IR kernels.
Chosen once per process: "auto" (the default) takes the first of ISAS the CPU can run; HYBRID_CPU_KERNELS
(auto | avx512 | avx2 | plain) or set_cpu_kernels (RuntimeOptions.cpu_kernels) forces one.

Paths of a weight:
  "int4-int8":      int4 weights x int8 activations, IR kernels of the active ISA (cpu_experts/int4_vnni.py);
  "avx512", "avx2": fp8 / bf16 weights x float32 activations, IR kernels (fp8_avx512.py, bf16_avx512.py);
  "plain":          the portable Numba kernels, float32 activations (int4.py, fp8.py, bf16.py): where the
                    ISA is plain or an input size is not a multiple of the fast kernels' unit.
Every kernel module has the expert contract of cpu_experts/int4.py (gateup / down over a LayerStore-like
buffer); the dense linears (cpu_experts/linear.py) run the same `down` drivers.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from types import ModuleType

from quant.formats import FORMAT_NAMES

from cpu_experts import bf16, bf16_avx512, fp8, fp8_avx512, int4, int4_vnni, ir

ACTIVATIONS = ("auto", "float", "int8")
KERNEL_CHOICES = ("auto", "plain")
CPU_KERNELS = ("auto", *ir.ISAS, "plain")      # the choices of HYBRID_CPU_KERNELS / --cpu-kernels
ENV = "HYBRID_CPU_KERNELS"
_forced: list[str] = []                        # set_cpu_kernels' choice (the last one wins)


def set_cpu_kernels(choice: str) -> str:
    """Use `choice` (one of CPU_KERNELS) for every weight loaded from now on, over HYBRID_CPU_KERNELS ("auto":
    no override, HYBRID_CPU_KERNELS or auto decides); returns active_isa(). ValueError when the CPU cannot
    run it."""
    resolve(choice, f"cpu_kernels={choice!r}")
    _forced[:] = [choice] if choice != "auto" else []
    return active_isa()


def active_isa() -> str:
    """The instruction set the IR kernels run: "avx512", "avx2" or "plain" (set_cpu_kernels' choice, else
    HYBRID_CPU_KERNELS, else auto). The name the start-up summary, stats and metrics report."""
    if _forced:
        return resolve(_forced[0], "cpu_kernels")
    return resolve(os.environ.get(ENV, "auto"), ENV)


def resolve(choice: str, source: str) -> str:
    """The ISA `choice` names on this CPU (auto: the first of ir.ISAS it can run, else plain, with a warning).
    ValueError for an unknown choice or a forced ISA whose features the CPU lacks."""
    if choice not in CPU_KERNELS:
        raise ValueError(f"{source}: unknown CPU kernels {choice!r}; use one of {', '.join(CPU_KERNELS)}")
    if choice == "auto":
        isa = next((i for i in ir.ISAS if ir.supported(i)), "plain")
        if isa == "plain":
            warn_plain(f"the CPU lacks {', '.join(ir.missing(ir.ISAS[-1]))} (the AVX2 kernels need "
                       f"{', '.join(ir.ISA_FEATURES[ir.ISAS[-1]])})")
        return isa
    if choice == "plain":
        warn_plain(f"{source} asks for them")
    elif not ir.supported(choice):
        raise ValueError(f"{source}: the {choice} kernels need CPU features {', '.join(ir.missing(choice))}, which "
                         f"this CPU lacks; use auto (picks what the CPU runs) or plain")
    return choice


@functools.lru_cache(maxsize=None)
def warn_plain(why: str) -> None:
    """One line on stderr, once per reason, when weights run on the slow plain kernels."""
    print(f"warning: CPU kernels: plain (portable, 35-100x slower) because {why}", file=sys.stderr)


@dataclass(frozen=True)
class FormatKernels:
    plain: ModuleType       # float activations, any shape, any CPU
    fast: ModuleType        # IR kernels: drivers that take the ISA (an index into ir.ISAS) as an argument
    fast_path: str          # the fast path's name; "" = the ISA's name
    unit: int               # the fast kernels need every input size to be a multiple of this: int4 128 (one
    #                         64-byte chunk of codes, and prepare_int8's activation block); fp8 64 (one chunk,
    #                         ir.fp8_order's permutation); bf16 32 (one chunk)


KERNELS = {"int4": FormatKernels(int4, int4_vnni, "int4-int8", 128),
           "fp8": FormatKernels(fp8, fp8_avx512, "", 64),
           "bf16": FormatKernels(bf16, bf16_avx512, "", 32)}
assert tuple(KERNELS) == FORMAT_NAMES, "one kernel entry per format of quant/formats.py"


def choose_path(fmt: str, inputs: tuple[int, ...], activations: str = "auto", kernels: str = "auto") -> str:
    """The path for weights in `fmt` whose products have these input sizes (an expert: (hidden, inter)).

    "auto" takes the fast path when active_isa() is not plain and every input size is a multiple of the
    format's unit, else plain (with a one-line warning saying why). activations (int4 only): "auto" = int8
    when fast, "float" = the exact plain path, "int8" = require the fast path (ValueError when it cannot run).
    """
    if activations not in ACTIVATIONS or kernels not in KERNEL_CHOICES:
        raise ValueError(f"activations={activations!r} (use one of {ACTIVATIONS}), kernels={kernels!r} "
                         f"(use one of {KERNEL_CHOICES})")
    k = KERNELS[fmt]
    isa = active_isa() if kernels == "auto" else "plain"
    fits = isa != "plain" and all(n % k.unit == 0 for n in inputs)
    if activations == "int8" and (fmt != "int4" or not fits):
        raise ValueError(f"activations='int8' needs int4 weights, the avx512 or avx2 kernels and input sizes that "
                         f"are multiples of 128; got fmt={fmt}, inputs {inputs}, kernels {isa}; use "
                         f"activations='auto' or 'float'")
    if fmt == "int4" and activations == "float":
        return "plain"
    if isa != "plain" and not fits:
        warn_plain(f"{fmt} input sizes {inputs} are not multiples of {k.unit}")
    return (k.fast_path or isa) if fits else "plain"


def isa_index(path: str) -> int:
    """The ISA argument (index into ir.ISAS) of the fast drivers for a weight on `path` (not plain)."""
    return ir.ISAS.index(path if path in ir.ISAS else active_isa())
