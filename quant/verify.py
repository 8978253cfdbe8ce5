"""hybrid-quant verify: a converted store's checksums, and a numeric check of sampled experts against the source."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .formats import get_format
from .int4 import dequantize_groups
from .convert import (MANIFEST, STORE_FORMAT, ConvertError, _sha256, expert_prefix, layer_file, model_shape,
                      read_config_dict)
from .store import LayerStore


def read_manifest(store: Path) -> dict:
    """The manifest of a complete store; ConvertError (saying to rerun the conversion) otherwise."""
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise ConvertError(f"{store} has no {MANIFEST}: it is not a complete expert store (an interrupted or "
                           f"failed conversion); rerun `hybrid-quant convert` with the same arguments")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise ConvertError(f"{path} is not valid JSON ({e}); rerun `hybrid-quant convert`") from None
    if m.get("format") != STORE_FORMAT:
        raise ConvertError(f"{path}: format {m.get('format')!r} is not {STORE_FORMAT!r}; rerun the conversion")
    return m


def verify(store: Path, against: Path | None = None, samples: int = 4) -> dict:
    store = Path(store)
    m = read_manifest(store)
    bad = []
    for rel, rec in m["files"].items():
        p = store / rel
        if not p.is_file():
            bad.append(f"{rel}: missing")
        elif p.stat().st_size != rec["bytes"] or _sha256(p) != rec["sha256"]:
            bad.append(f"{rel}: checksum differs from the manifest")
    report = {"store": str(store), "expert_format": m["expert_format"], "files": len(m["files"]),
              "checksum_errors": bad}
    if against is not None:
        report["source_errors"] = _source_errors(m, Path(against))
        report["numeric"] = _numeric(store, m, Path(against), samples)
    report["ok"] = not bad and not report.get("source_errors") and all(v["max_abs_error"] <= v["bound"] for v in report.get("numeric", {}).values())
    # max_abs_error is relative to each matrix's max |w| (see bound())
    return report


def _source_errors(m: dict, src: Path) -> list[str]:
    """Every source shard the manifest fingerprinted, compared whole (sha256) with the folder given: a flipped
    byte anywhere in the source is found, not only in the experts the numeric check samples."""
    bad = []
    for name, digest in m.get("source_shards", {}).items():
        p = src / name
        if not p.is_file():
            bad.append(f"{name}: missing from {src}")
        elif _sha256(p) != digest:
            bad.append(f"{name}: differs from the shard the store was converted from (sha256)")
    return bad


_EXACT = {("block-fp8", "fp8"), ("bf16", "bf16"), ("compressed-tensors-int4", "int4")}


def bound(source_kind: str, fmt: str) -> float:
    """Worst error of a stored weight relative to its matrix's max |w|. Exact copies: 0; else the format's
    rounding (Format.max_rel_error) with 1 % slack, which covers the bf16 rounding of int4 scales."""
    if (source_kind, fmt) in _EXACT:
        return 0.0
    return get_format(fmt).max_rel_error * 1.01


def _numeric(store: Path, m: dict, src: Path, samples: int) -> dict:
    from . import compressed
    shape = model_shape(read_config_dict(src, ConvertError), str(src))
    out = {}
    with Checkpoint.open(src) as ck:
        for L in m["moe_layers"]:
            ls = LayerStore.load(store / layer_file(L))
            picks = sorted({int(x) for x in np.linspace(0, m["n_experts"] - 1, max(1, samples))})
            worst = 0.0
            for e in picks:
                for mat, got in zip(("gate", "up", "down"), ls.dequantize(e)):
                    prefix = expert_prefix(L, e, mat)
                    if compressed.is_compressed(shape.quantization_config):
                        w4 = compressed.read_int4(ck, prefix, got.shape, compressed.group_size_of(shape.quantization_config))
                        ref = dequantize_groups(w4.q, w4.scales, w4.group_size)
                    else:
                        ref = ck.get(prefix + ".weight", dtype=torch.float32).numpy()
                    worst = max(worst, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)))
            out[f"layer {L}"] = {"experts": picks, "max_abs_error": worst,
                                 "bound": bound(m["source_kind"], m["expert_format"])}
    return out
