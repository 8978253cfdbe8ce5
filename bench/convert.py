"""Conversion throughput: `hybrid-quant convert` on the bench model, input MB/s and peak RSS.

    python -m bench.convert --model BENCH_DIR [--formats int4,fp8] [--work DIR]

Each conversion runs in its own process, from a cold output folder; the table gives input bytes read,
seconds, input MB/s, peak anonymous memory (sampled every 50 ms: what the conversion itself holds), peak RSS
(which also counts the memory-mapped input and output pages the kernel may drop), and the size of the largest
MoE layer beside them, to show that memory stays bounded by a layer, not the model.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quant.convert import PeakAnonMemory


def run(model: Path, fmt: str, work: Path) -> dict:
    out = work / f"store-{fmt}"
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "quant", "convert", "--input", str(model), "--output", str(out),
                             "--format", fmt, "--quiet"])
    with PeakAnonMemory(proc.pid) as anon:
        if proc.wait():
            raise SystemExit(f"conversion to {fmt} failed (exit {proc.returncode})")
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss    # KiB; the max over children so far
    manifest = json.loads((out / "hybrid-store.json").read_text())
    layer = max(r["bytes"] for k, r in manifest["files"].items() if k.startswith("experts/"))
    src = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    shutil.rmtree(out)
    return {"secs": secs, "input_bytes": src, "peak_rss": peak * 1024, "peak_is_new": peak > before,
            "peak_anon": anon.peak, "largest_layer": layer}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--formats", default="int4,fp8")
    p.add_argument("--work", type=Path, help="scratch folder for the stores (default: a temp dir)")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    print("| format | input GiB | seconds | input MB/s | peak anonymous memory GiB | peak RSS incl. mapped files GiB | largest layer GiB |")
    print("|---|---|---|---|---|---|---|")
    for fmt in [f for f in a.formats.split(",") if f]:
        r = run(a.model, fmt, work)
        rss = f"{r['peak_rss'] / 2**30:.2f}" if r["peak_is_new"] else "<= previous"
        print(f"| {fmt} | {r['input_bytes'] / 2**30:.2f} | {r['secs']:.1f} | {r['input_bytes'] / r['secs'] / 1e6:.0f} | "
              f"{r['peak_anon'] / 2**30:.2f} | {rss} | {r['largest_layer'] / 2**30:.2f} |", flush=True)


if __name__ == "__main__":
    main()
