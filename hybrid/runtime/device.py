"""Where the device side runs, in which dtype, and with how many CPU threads: one rule for each.

    resolve_device("auto") -> cuda if present, else cpu (the CPU stands in for the GPU)
    resolve_devices("cuda:0,cuda:1", "auto") -> the devices of a device map, checked (None: the one device)
    resolve_dtype("auto", device) -> bfloat16 on CUDA, float32 on the CPU
    resolve_threads(None) -> the physical cores (cpu_experts.physical_cores, the one definition)
"""
from __future__ import annotations

import torch

from cpu_experts.moe import physical_cores

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {str(device)!r} is not a device name; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; "
                         f"use 'cpu' (or 'auto') instead")
    if d.type not in ("cuda", "cpu"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'auto', 'cpu' or 'cuda[:N]'")
    n = torch.cuda.device_count() if d.type == "cuda" else 0
    if d.type == "cuda" and d.index is not None and d.index >= n:
        raise ValueError(f"device {str(device)!r} was asked for but this machine has {n} CUDA device(s) "
                         f"(cuda:0{f'..cuda:{n - 1}' if n > 1 else ''}); `nvidia-smi -L` lists them")
    return d


def resolve_devices(devices: str | None, device: str | torch.device = "auto") -> tuple[torch.device, ...]:
    """The devices of a run, in layer order. None: (resolve_device(device),). "auto": every CUDA device, or the
    CPU alone without CUDA. Else the comma-separated names, each checked by resolve_device; all of one type (a
    map does not mix the CPU with GPUs) and no GPU twice. The CPU may be listed several times: each entry is a
    logical device of its own (its layers, KV cache and hot set), the stand-in that tests a map without GPUs."""
    if devices is None:
        return (resolve_device(device),)
    if devices.strip() == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return tuple(torch.device("cuda", i) for i in range(n)) or (torch.device("cpu"),)
    names = [x.strip() for x in devices.split(",")]
    if "auto" in names:
        raise ValueError(f"devices={devices!r}: 'auto' stands for the whole map (devices='auto'), not one entry")
    try:
        out = tuple(_one(resolve_device(x)) for x in names)
    except ValueError as e:
        raise ValueError(f"devices={devices!r}: {e}") from None
    if len({d.type for d in out}) > 1:
        raise ValueError(f"devices={devices!r} mixes the CPU with CUDA devices; a map holds devices of one type "
                         f"(list only the GPUs: the CPU runs the routed experts anyway)")
    twice = sorted({str(d) for d in out if d.type == "cuda" and out.count(d) > 1})
    if twice:
        raise ValueError(f"devices={devices!r} lists {', '.join(twice)} more than once; a GPU's memory would be "
                         f"counted twice (only the CPU stand-in may repeat)")
    return out


def _one(d: torch.device) -> torch.device:
    """A map's entry with its index: cuda -> cuda:<current>, cpu:N -> cpu (one CPU)."""
    if d.type == "cpu":
        return torch.device("cpu")
    return d if d.index is not None else torch.device("cuda", torch.cuda.current_device())


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto', 'float32' or 'bfloat16'")
    return DTYPES[dtype]


def resolve_threads(threads: int | None) -> int:
    """CPU threads for the expert kernels and host-side torch: the physical cores unless given."""
    return threads or physical_cores()
