"""`hybrid-quant` command line (also `python -m quant`): inspect checkpoints, export GGUF.

The conversion to the expert store (`convert`) is tracked as its own work item and is not here yet.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .checkpoint import ITEMSIZE, SCALE_SUFFIX, Checkpoint
from .errors import CheckpointError
from .formats import FORMAT_NAMES

def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


SCALE_SUFFIXES = (SCALE_SUFFIX, "_scale")      # scales listed as tensors of their own (a store's int4 scales)
FLOATS = ("BF16", "F16", "F32")
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")   # the router stays float32


def default_run_dense_bytes(ck: Checkpoint, num_layers: int | None) -> tuple[int, int]:
    """(device bytes of the dense part, bytes of the buffer a CUDA device dequantizes packed linears into) as a
    default run keeps them (`--dense auto`, bf16 compute): the dense linears and lm_head in the format they are
    stored in (FP8 codes + block scales as released, a store's packed codes + scales; float ones as bf16), the
    router float32, everything else bf16. The buffer is the largest packed linear in bf16.

    This mirrors hybrid.core.placement.dense_device_bytes(cfg, 2, "auto"), which quant may not import (it is a
    leaf package); tests/quant/test_convert.py checks the two agree. The MTP layer (index >= num_layers) is
    left out, as the loader leaves it out."""
    from .convert import is_expert_tensor
    from .dense import dense_kind
    dense = buffer = 0
    for n in ck.names:
        parts = n.split(".")
        if is_expert_tensor(n) or (num_layers is not None and parts[:2] == ["model", "layers"]
                                   and int(parts[2]) >= num_layers):
            continue
        dtype, numel = ck.dtype(n), ck.nbytes(n) // ITEMSIZE[ck.dtype(n)]
        is_scale = n.endswith(SCALE_SUFFIXES)
        if n.endswith(FP32_SUFFIXES):
            dense += numel * 4
        elif dtype in FLOATS and not is_scale:
            dense += numel * 2
        else:
            dense += ck.nbytes(n) + (ck.nbytes(n + SCALE_SUFFIX) if n + SCALE_SUFFIX in ck else 0)  # as stored
        if dense_kind(n) is not None and not is_scale:
            buffer = max(buffer, numel * (2 if dtype == "U8" else 1) * 2)   # U8 codes: two int4 values a byte
    return dense, buffer


def cmd_inspect(a) -> int:
    """Format, sizes, and what a run needs: device memory for the dense part and the KV cache, host RAM
    for the routed experts (per format for a checkpoint; as stored for a converted store)."""
    from .convert import MANIFEST, is_expert_tensor, model_shape, read_config_dict
    from .formats import bytes_per_matrix
    cfg = read_config_dict(a.dir) if (Path(a.dir) / "config.json").is_file() else {}
    with Checkpoint.open(a.dir) as ck:
        dtypes, nbytes = Counter(), Counter()
        expert_bytes = 0
        for n in ck.names:
            b = ck.nbytes(n)
            dtypes[ck.dtype(n)] += 1
            nbytes[ck.dtype(n)] += b
            if is_expert_tensor(n):
                expert_bytes += b
        dense, buffer = default_run_dense_bytes(ck, cfg.get("num_hidden_layers"))
    report = {"folder": str(a.dir), "tensors": len(ck.names), "by_dtype": dict(dtypes),
              "bytes_by_dtype": dict(nbytes), "format": "block-fp8" if dtypes.get("F8_E4M3") else "bf16/f32",
              "dense_device_bytes": dense, "dense_decode_buffer_bytes_cuda": buffer}
    if cfg:
        model_shape(cfg, str(a.dir))               # a config without the DeepSeek fields: a clear error
        missing = [k for k in ("num_hidden_layers", "kv_lora_rank", "qk_rope_head_dim") if not isinstance(cfg.get(k), int)]
        if missing:
            raise ValueError(f"{a.dir}/config.json lacks integer fields {missing}; copy it unchanged from the checkpoint")
        report["kv_cache_bytes_per_1k_tokens_bf16"] = 1000 * cfg["num_hidden_layers"] * (
            cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 2
    manifest = Path(a.dir) / MANIFEST
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        layers = {k: v["bytes"] for k, v in m["files"].items() if k.startswith("experts/")}
        report.update(format=f"expert store ({m['expert_format']}, group {m['group_size']})",
                      store_layer_bytes=layers, host_expert_bytes={m["expert_format"]: sum(layers.values())})
    elif cfg:
        shape = model_shape(cfg, str(a.dir))
        H, I, n = shape.hidden, shape.inter, shape.n_experts * len(shape.moe_layers)
        report["routed_expert_bytes_as_stored"] = expert_bytes
        report["host_expert_bytes"] = {f: n * sum(bytes_per_matrix(f, r, c) for r, c in ((I, H), (I, H), (H, I)))
                                       for f in FORMAT_NAMES}
    if a.json:
        print(json.dumps(report))
        return 0
    print(f"{report['folder']}: {report['tensors']} tensors, format {report['format']}")
    for dt, c in sorted(dtypes.items()):
        print(f"  {dt:8s} {c:6d} tensors  {nbytes[dt] / 2**20:10.1f} MiB")
    for k, v in report.get("store_layer_bytes", {}).items():
        print(f"  {k}: {v / 2**20:.1f} MiB")
    print("a run needs:")
    print(f"  device: dense weights {_size(dense)} (--dense auto: linears as stored, the rest bf16, router f32; "
          f"CUDA adds a {_size(buffer)} buffer they are dequantized into)" + (
        f" + KV cache {report['kv_cache_bytes_per_1k_tokens_bf16'] / 2**20:.1f} MiB per 1k tokens of context"
        if "kv_cache_bytes_per_1k_tokens_bf16" in report else ""))
    for f, v in report.get("host_expert_bytes", {}).items():
        print(f"  host RAM for routed experts in {f}: {_size(v)}")
    return 0


def cmd_convert(a) -> int:
    from .convert import convert
    convert(a.input, a.output, a.format, a.group_size, a.threads, a.quiet, a.dense)
    return 0


def cmd_verify(a) -> int:
    from .verify import verify
    report = verify(a.dir, a.against, a.samples)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The `hybrid-quant` parser: inspect, export-gguf, convert, verify (each sets func)."""
    p = argparse.ArgumentParser(prog="hybrid-quant", description="Inspect and convert K2 / DeepSeek-V3 checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="tensor counts, dtypes and sizes of a checkpoint folder")
    i.add_argument("dir", type=Path, help="an HF checkpoint folder or a converted expert store")
    i.add_argument("--json", action="store_true", help="print the report as one JSON object")
    i.set_defaults(func=cmd_inspect)
    from .gguf_export import add_export_parser
    add_export_parser(sub)
    c = sub.add_parser("convert", help="convert an HF checkpoint into the expert store (resumable)")
    c.add_argument("--input", type=Path, required=True, help="HF model folder: BF16, block-FP8 or compressed-tensors INT4")
    c.add_argument("--output", type=Path, required=True, help="new or empty folder (or an interrupted conversion)")
    c.add_argument("--format", required=True, choices=FORMAT_NAMES,
                   help="format of the routed experts in the store (int4: 4-bit groups, the smallest; fp8: the "
                        "official release's own bytes; bf16)")
    c.add_argument("--dense", choices=FORMAT_NAMES, default=None,
                   help="format of the dense linear weights (attention, shared experts, dense MLPs, lm_head); "
                        "default: as the checkpoint stores them")
    c.add_argument("--group-size", type=int, default=32, help="int4 group size: 32 (default), 64 or 128")
    c.add_argument("--threads", type=int, default=1, help="MoE layers converted at once (each holds one layer's reads; "
                                                                   "default 1)")
    c.add_argument("--quiet", action="store_true", help="no per-layer progress lines")
    c.set_defaults(func=cmd_convert)
    v = sub.add_parser("verify", help="check a converted store's checksums (and numbers against the source)")
    v.add_argument("dir", type=Path, help="the converted store to check")
    v.add_argument("--against", type=Path, help="the source checkpoint: compare a sample of experts numerically")
    v.add_argument("--samples", type=int, default=4, help="experts per MoE layer compared with --against "
                                                                     "(default 4)")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, OSError) as e:
        print(f"hybrid-quant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybrid-quant: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
