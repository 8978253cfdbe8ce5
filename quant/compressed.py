"""Kimi K2-Thinking's native INT4 release: compressed-tensors "pack-quantized" routed experts.

Each quantized Linear `<p>` is stored as three tensors (compressed-tensors' pack_to_int32, packed_dim 1):
    <p>.weight_packed  int32 [out, in/8]: 8 codes per word along the input dim, code j in bits 4j..4j+3,
                       each code = q + 8 (offset binary), q in [-8, 7]
    <p>.weight_scale   bf16  [out, in/group]: one scale per group of `group_size` (32) inputs, symmetric
    <p>.weight_shape   int32 [2]: (out, in)
    W = q * scale
Non-expert tensors (attention, shared experts, dense MLP, lm_head) stay BF16 in that release.
unpack_int32() is exact, so an INT4 group-32 store made from it holds the released codes and scales
bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import CheckpointError
from .store import Int4Weights

SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape")


def is_compressed(quantization_config: dict | None) -> bool:
    q = quantization_config or {}
    return q.get("quant_method") == "compressed-tensors"


def group_size_of(quantization_config: dict) -> int:
    """The weights' group size from config_groups (K2-Thinking: 32); must be symmetric 4-bit int groups."""
    for name, group in (quantization_config.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if (w.get("num_bits"), w.get("type", "int"), w.get("symmetric", True), w.get("strategy", "group")) \
                != (4, "int", True, "group"):
            raise CheckpointError(f"compressed-tensors group {name!r} is {w}; only symmetric 4-bit integer "
                                  f"groups (K2-Thinking's W4A16) are supported")
        return int(w.get("group_size") or 32)
    raise CheckpointError("compressed-tensors quantization_config has no config_groups; the config.json does "
                          "not describe the weights")


def unpack_int32(packed: np.ndarray, in_features: int) -> np.ndarray:
    """int32 [out, in/8] -> int8 codes [out, in] in [-8, 7]."""
    words = np.ascontiguousarray(packed, dtype=np.int32).view(np.uint32)
    shifts = np.arange(8, dtype=np.uint32) * 4
    codes = ((words[:, :, None] >> shifts) & 0xF).astype(np.int8) - 8
    return codes.reshape(words.shape[0], -1)[:, :in_features]


def pack_int32(q: np.ndarray) -> np.ndarray:
    """int codes [out, in] in [-8, 7] -> int32 [out, ceil(in/8)] (compressed-tensors' layout; for tests and tools)."""
    q = np.asarray(q, dtype=np.int16)
    pad = -q.shape[1] % 8
    u = np.pad(q + 8, ((0, 0), (0, pad))).astype(np.uint32).reshape(q.shape[0], -1, 8)
    return (u << (np.arange(8, dtype=np.uint32) * 4)).sum(axis=2, dtype=np.uint32).view(np.int32)


def read_int4(ckpt, prefix: str, shape: tuple[int, int], group_size: int) -> Int4Weights:
    """The INT4 weight `<prefix>` (e.g. model.layers.1.mlp.experts.0.gate_proj) from a Checkpoint."""
    names = [prefix + s for s in SUFFIXES]
    for n in names:
        if n not in ckpt:
            raise CheckpointError(f"tensor {n!r} is missing: a compressed-tensors INT4 weight needs "
                                  f"{', '.join(SUFFIXES)}", file=ckpt.model_dir)
    stored = tuple(int(x) for x in ckpt.get_raw(names[2]).tolist())
    if stored != tuple(shape):
        raise CheckpointError(f"{names[2]} says {stored} but {tuple(shape)} was expected: the config.json does "
                              f"not match the weights", file=ckpt.file_of(names[2]), tensor=names[2])
    out, inp = shape
    want = {names[0]: (out, -(-inp // 8)), names[1]: (out, inp // group_size)}
    for n, s in want.items():
        if tuple(ckpt.shape(n)) != s:
            raise CheckpointError(f"has shape {list(ckpt.shape(n))} but {list(s)} was expected for a {list(shape)} "
                                  f"weight in groups of {group_size}", file=ckpt.file_of(n), tensor=n)
    packed = ckpt.get_raw(names[0]).numpy()
    scales = ckpt.get_raw(names[1]).to(torch.bfloat16).view(torch.uint16).numpy()
    return Int4Weights(unpack_int32(packed, inp), scales, group_size)
