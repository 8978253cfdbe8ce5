"""`hybrid-quant` command line (also `python -m quant`): inspect checkpoints, export GGUF.

The conversion to the expert store (`convert`) is tracked as its own work item and is not here yet.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import CheckpointError

_BYTES = {"F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "I32": 4, "I64": 8}


def cmd_inspect(a) -> int:
    with Checkpoint.open(a.dir) as ck:
        dtypes, nbytes = Counter(), Counter()
        expert_bytes = 0
        for n in ck.names:
            numel = 1
            for s in ck.shape(n):
                numel *= s
            b = numel * _BYTES.get(ck.dtype(n), 4)
            dtypes[ck.dtype(n)] += 1
            nbytes[ck.dtype(n)] += b
            if ".mlp.experts." in n:
                expert_bytes += b
        report = {"folder": str(a.dir), "tensors": len(ck.names), "by_dtype": dict(dtypes),
                  "bytes_by_dtype": dict(nbytes), "routed_expert_bytes": expert_bytes,
                  "format": "block-fp8" if dtypes.get("F8_E4M3") else "bf16/f32"}
    if a.json:
        print(json.dumps(report))
    else:
        print(f"{report['folder']}: {report['tensors']} tensors, format {report['format']}")
        for dt, c in sorted(dtypes.items()):
            print(f"  {dt:8s} {c:6d} tensors  {nbytes[dt] / 2**20:10.1f} MiB")
        print(f"  routed experts: {expert_bytes / 2**20:.1f} MiB (scales excluded)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hybrid-quant", description="Inspect and convert K2 / DeepSeek-V3 checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="tensor counts, dtypes and sizes of a checkpoint folder")
    i.add_argument("dir", type=Path)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    from .gguf_export import add_export_parser
    add_export_parser(sub)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"hybrid-quant: error: {e}", file=sys.stderr)
        return 2
