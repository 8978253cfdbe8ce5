"""Write a Hugging Face style sharded checkpoint: model-0000i-of-0000n.safetensors + index.

Used by make-tiny and the converter. Tensors stream in; only the shard being filled is held (by
reference). Each file is written under a temporary name and renamed when complete, and the index is
written last, so an interrupted write never leaves a folder that Checkpoint.open accepts as whole.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from quant.checkpoint import INDEX_NAME, SCALE_SUFFIX
from quant.fp8 import quantize_blocks

WRITABLE_DTYPES = (torch.float8_e4m3fn, torch.bfloat16, torch.float16, torch.float32,
                   torch.int32, torch.int64, torch.uint8, torch.int8)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _checked(name, t) -> torch.Tensor:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor '{name}' is a {type(t).__name__}; pass a torch.Tensor "
                        "(torch.from_numpy for numpy arrays)")
    if t.dtype not in WRITABLE_DTYPES:
        raise TypeError(f"tensor '{name}' has dtype {t.dtype}; supported: {WRITABLE_DTYPES}")
    return t.detach().cpu().contiguous()


def _groups(items, max_shard_bytes: int):
    """Yield lists of (name, tensor) whose bytes stay within max_shard_bytes (a larger tensor alone)."""
    group, size, seen = [], 0, set()
    for name, t in items:
        t = _checked(name, t)
        if name in seen:
            raise ValueError(f"tensor '{name}' is given twice; names in a checkpoint must be unique")
        seen.add(name)
        if group and size + _nbytes(t) > max_shard_bytes:
            yield group
            group, size = [], 0
        group.append((name, t))
        size += _nbytes(t)
    if group:
        yield group


def _replace_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_sharded(model_dir, tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                  max_shard_bytes: int, metadata: dict | None = None) -> list[Path]:
    """Write tensors as shards + model.safetensors.index.json into model_dir (created if needed).

    Args:
        model_dir: output folder.
        tensors: (name, tensor) pairs in the order to store them, or a dict. Dtypes: float8_e4m3fn,
            bf16, f16, f32 (and plain integer types). Names must be unique.
        max_shard_bytes: a shard is closed before it would exceed this many tensor bytes; a tensor
            larger than that gets a shard of its own.
        metadata: str -> str written into every shard header's `__metadata__` (next to "format": "pt").
    Returns:
        the shard paths, in order. Index: {"metadata": {"total_size": bytes of tensor data},
        "weight_map": {name: shard file name}}.
    Example:
        >>> write_sharded("tiny", fp8_tensors("w.weight", np.ones((256, 128), np.float32)), 1 << 20)
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    header_meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str (safetensors stores text), got {k!r}: {v!r}")
        header_meta[k] = v
    folder = Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    temps, names, total = [], [], 0
    try:
        for i, group in enumerate(_groups(items, max_shard_bytes), start=1):
            tmp = folder / f"model-{i:05d}.safetensors.tmp"
            temps.append(tmp)
            save_file(dict(group), str(tmp), metadata=header_meta)
            names.append([name for name, _ in group])
            total += sum(_nbytes(t) for _, t in group)
        if not temps:
            raise ValueError("no tensors to write; a checkpoint needs at least one")
        shards = [folder / _shard_name(i, len(temps)) for i in range(1, len(temps) + 1)]
        umask = os.umask(0)
        os.umask(umask)
        for tmp, final in zip(temps, shards):
            os.chmod(tmp, 0o666 & ~umask)   # save_file's temp files are private (0600); shards are not
            os.replace(tmp, final)
        weight_map = {n: s.name for s, group in zip(shards, names) for n in group}
        _replace_json(folder / INDEX_NAME,
                      {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return shards


def fp8_tensors(name: str, w: np.ndarray) -> list[tuple[str, torch.Tensor]]:
    """Quantize a float [out, in] weight to block FP8 (quant.fp8.quantize_blocks, 128x128 blocks).

    Returns [(name, float8_e4m3fn [out, in]), (name + "_scale_inv", float32 [ceil(out/128), ceil(in/128)])],
    so "x.weight" gets "x.weight_scale_inv" as in the official K2 / DeepSeek-V3 checkpoints.
    """
    codes, scale_inv = quantize_blocks(np.asarray(w, dtype=np.float32))
    return [(name, torch.from_numpy(codes).view(torch.float8_e4m3fn)),
            (name + SCALE_SUFFIX, torch.from_numpy(scale_inv))]
