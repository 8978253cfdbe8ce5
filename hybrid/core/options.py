"""RuntimeOptions: every knob of hybrid.load in one frozen dataclass, checked before any I/O.

This is the one list: `hybrid.load(model_dir, **options)` takes exactly these keywords (its signature is
built from the fields), and `hybrid generate` / `hybrid serve` get one flag per field (`--gpu-expert-budget`
for gpu_expert_budget), with the help text, choices and type written here beside the field.
"""
from __future__ import annotations

import argparse
import inspect
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from quant.formats import FORMAT_NAMES

from hybrid.core.knobs import HOT_SET_GRAMMAR, TRANSFER_GRAMMAR, HotSetSize, TransferBudget, parse_size
from hybrid.core.placement import HOT_SET_FORMATS, resolve_hot_set_format

EXPERT_FORMATS = FORMAT_NAMES
EXPERT_CHOICES = ("auto", *EXPERT_FORMATS, "torch")
PREFETCH_CHOICES = ("auto", "off", "static", "lru", "lfu", "router")
ACTIVATION_CHOICES = ("auto", "float")
DENSE_CHOICES = ("auto", *FORMAT_NAMES, "torch")


def _opt(default, help: str, choices=None, cli_type=str, metavar=None):
    """A field with what its command-line flag needs: help text, choices, the type argparse converts to."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": cli_type, "metavar": metavar})


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError(f"write on or off, not {text!r}")
    return text == "on"


def _size(text: str) -> int | str:
    """A flag's memory size: plain digits become an int of bytes; '20GiB' stays text (checked in __post_init__)."""
    return int(text) if text.isdigit() else text


def flag_parser(parse):
    """`parse` (text -> value, ValueError naming the grammar) as an argparse type: the message reaches the user
    as it is written, instead of argparse's "invalid value"."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


@dataclass(frozen=True)
class DenseChoice:
    """The dense knob resolved (resolve_dense): `run` is what the loader builds (torch | auto | int4 | fp8 |
    bf16; auto = each linear in its stored format), `counted` what the placement sizes (a store's own format
    for auto)."""
    run: str
    counted: str


def resolve_dense(requested: str, experts: str, stored: str | None) -> DenseChoice:
    """The one resolution of dense="auto": the float reference (torch) with experts="torch", else the
    checkpoint's own formats, which a converted store names (`stored`, its manifest's dense_format)."""
    run = "torch" if requested == "auto" and experts == "torch" else requested
    return DenseChoice(run, stored if run == "auto" and stored in FORMAT_NAMES else run)


def _check_devices(device: str, devices: str | None) -> None:
    """devices: None, "auto" or names separated by commas (each checked against the machine at load)."""
    if devices is None:
        return
    if not isinstance(devices, str) or not devices.strip():
        raise ValueError(f"devices={devices!r}: write device names separated by commas, e.g. cuda:0,cuda:1, or auto")
    if any(not name.strip() for name in devices.split(",")):
        raise ValueError(f"devices={devices!r} has an empty entry; write e.g. cuda:0,cuda:1")
    if str(device) != "auto":
        raise ValueError(f"give device={device!r} or devices={devices!r}, not both (--device names one device, "
                         f"--devices a map of several)")


# Checked before anything starts: threads as the kernel pool allows (cpu_experts.pool.MAX_THREADS; torch would
# try to start a million threads before the pool refused them); a KV block of more tokens than any context
# needs only wastes the pool (a block of 1e9 tokens asked for 576 GB at once).
UPPER_BOUNDS = {"threads": 256, "kv_block_size": 4096}

@dataclass(frozen=True)
class RuntimeOptions:
    device: str = _opt("auto", "auto | cpu | cuda[:N]: where attention, the router, the shared expert, dense "
                                "layers, lm_head and the expert hot set run (auto: CUDA if present, else the CPU)")
    devices: str | None = _opt(None, "a device map instead of one device: cuda:0,cuda:1,... or auto (every CUDA "
                                     "device); the layers are split in contiguous ranges as `hybrid plan` splits "
                                     "them (embeddings on the first, lm_head on the last), each device with its own "
                                     "KV cache and hot set; the CPU experts are shared. The CPU may be listed more "
                                     "than once (cpu,cpu: the stand-in, for tests)")
    dtype: str = _opt("auto", "device compute dtype: auto (bfloat16 on CUDA, float32 on the CPU) | float32 | bfloat16")
    experts: str = _opt("auto", "routed-expert format on the CPU (auto = the checkpoint's own: fp8 for the "
                                "official release; torch = every expert dequantized on the device, the reference)",
                        EXPERT_CHOICES)
    gpu_expert_budget: HotSetSize | int | str = _opt(0, "device hot-set size: " + HOT_SET_GRAMMAR.replace("%", "%%")
                                                     + "; 0 = no hot set", cli_type=flag_parser(HotSetSize.parse),
                                                     metavar="SIZE")
    hot_set_format: str = _opt("auto", "how hot-set experts are kept on the device: packed = in the store's "
                                       "format (INT4 or FP8 codes + scales, 3.6x smaller than bf16 for INT4), "
                                       "decoded per use into one reused buffer | bf16 = dequantized to the "
                                       "compute dtype (auto: bf16, the faster per hit; packed holds ~3.5x as many)",
                               ("auto", *HOT_SET_FORMATS))
    prefetch: str = _opt("auto", "hot-set policy (auto = router when the budget is non-zero)", PREFETCH_CHOICES)
    placement: str | Path | None = _opt(None, "placement.json for --prefetch static (hybrid profile writes one)",
                                        cli_type=Path)
    transfer_budget: TransferBudget | int | str = _opt("auto", f"how much the hot set may copy to the device: "
                                                               f"{TRANSFER_GRAMMAR}",
                                                       cli_type=flag_parser(TransferBudget.parse), metavar="BUDGET")
    threads: int | None = _opt(None, "CPU threads for the expert kernels and host-side torch (default: physical "
                                     "cores)", cli_type=int)
    context: int | None = _opt(None, "tokens of KV cache the placement reserves (default: min(max_position_"
                                     "embeddings, 32768))", cli_type=int)
    gpu_memory: int | str | None = _opt(None, "device memory the placement may use, e.g. 20GiB (default: what "
                                              "is free)", cli_type=_size)
    dense: str = _opt("auto", "dense (non-expert) linears: auto = the checkpoint's own format (fp8 for the official "
                              "release) kept packed and run by the project's kernels on the CPU, or dequantized per "
                              "use on CUDA; int4 | fp8 | bf16 = that format; torch = float torch modules in the "
                              "compute dtype (the reference; auto with experts=torch)", DENSE_CHOICES)
    activations: str = _opt("auto", "INT4 kernels: auto = int8 activations (VNNI dot products, ~1e-2 of max|y| "
                                    "from exact, like llama.cpp's Q4_0 x Q8_0) | float (exact, slow)",
                            ACTIVATION_CHOICES)
    cpu_kernels: str = _opt("auto", "instruction set of the CPU kernels: auto = avx512 where the CPU has avx512f, "
                                    "avx512bw, avx512vl, avx512vnni, avx512vbmi and fma, else avx2 (avx2, fma, f16c), "
                                    "else plain (portable, 35-100x slower) | avx512 | avx2 | plain (an error if the "
                                    "CPU lacks its features); HYBRID_CPU_KERNELS sets it too",
                            ("auto", "avx512", "avx2", "plain"))    # = cpu_experts.paths.CPU_KERNELS (a test checks)
    max_batch: int = _opt(8, "sequences one forward step may carry: decode tokens of running requests plus prompt "
                             "chunks of new ones", cli_type=int)
    max_batch_tokens: int = _opt(512, "tokens per forward step; a longer prompt is prefilled in chunks of this "
                                      "many tokens, so it never stalls running requests", cli_type=int)
    kv_block_size: int = _opt(32, "tokens per block of the paged KV cache (the unit of prefix reuse)", cli_type=int)
    prefix_cache: bool = _opt(True, "on | off: reuse the KV blocks of prompt prefixes already computed (a "
                                    "conversation resent each turn prefills only its new tail)",
                              cli_type=_on_off, metavar="on|off")

    def __post_init__(self):
        object.__setattr__(self, "gpu_expert_budget", HotSetSize.parse(self.gpu_expert_budget))
        object.__setattr__(self, "transfer_budget", TransferBudget.parse(self.transfer_budget))
        if self.gpu_memory is not None:
            parse_size(self.gpu_memory)
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        if self.prefetch == "static" and self.placement is None:
            raise ValueError("prefetch='static' needs a placement file (placement=..., --placement FILE); "
                             "`hybrid profile` writes one")
        _check_devices(self.device, self.devices)
        if self.experts != "auto":       # an explicit format is known now; "auto" is checked once the store is read
            resolve_hot_set_format(self.hot_set_format, self.experts)
        for name in ("threads", "context", "max_batch", "max_batch_tokens", "kv_block_size"):
            v, hi = getattr(self, name), UPPER_BOUNDS.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1 or (hi and v > hi)):
                raise ValueError(f"{name} must be an int from 1 to {hi}, got {v!r}" if hi else
                                 f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False (on/off on the command line), "
                             f"got {self.prefix_cache!r}")

    @property
    def hot_set_policy(self) -> str | None:
        """The one reading of prefetch: None when there is no hot set to fill (prefetch="off"), else the
        policy's name (auto: router)."""
        if self.prefetch == "off":
            return None
        return "router" if self.prefetch == "auto" else self.prefetch

    @classmethod
    def signature(cls) -> list[inspect.Parameter]:
        """The keyword-only parameters of hybrid.load, one per field, with the field's default."""
        return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                  default=f.default if f.default is not MISSING else None, annotation=f.type)
                for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "RuntimeOptions":
        """Build from hybrid.load's keywords; an unknown keyword is a TypeError listing the known ones."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(kwargs) - known)
        if bad:
            raise TypeError(f"hybrid.load() got unknown option(s) {', '.join(bad)}; options are "
                            f"{', '.join(f.name for f in fields(cls))}")
        return cls(**kwargs)
