"""End-to-end prefill and decode: our engine (INT4 / FP8 / BF16 experts and dense layers) against llama.cpp on
the same weights.

    python -m bench.decode --model BENCH_DIR [--threads 2] [--ours int4,fp8,bf16] [--llama q4_0,q8_0,bf16]
                           [--dense pair|auto|int4|fp8|bf16|torch]

In one run, interleaved: this machine's read limit (the prefetching read loop of bench.kernels), then each
engine, then the limit again, ...; per engine prompt processing at 128 and 512 tokens and greedy decode of 64
tokens, repeated; the table gives the median and spread, the bytes of weights one decoded token reads (the
dense part in its format: `--dense pair` runs ours with the dense linears in the experts' format, int4+int4
against Q4_0, fp8+fp8 against Q8_0, bf16+bf16 against BF16), the whole-token effective bandwidth (those
bytes x tokens/s), its share of the mean of the limits measured just before and after that engine, and
our/llama.cpp ratios. llama.cpp runs through llama-cpp-python on GGUFs exported from the same checkpoint by
`hybrid-quant export-gguf` (made on first use in --gguf-dir), with yarn_beta_fast/slow = 1 (llama.cpp
ignores the GGUF's keys; K2 needs 1/1) and an f32 KV cache. The issue-14 goals are checked at the end.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import numpy as np

from quant.formats import FORMATS

PAIRS = {f.name: f.ggml_type.lower() for f in FORMATS.values()}    # ours -> the llama.cpp type it is compared to
# issue 14: ours/llama.cpp decode per pair, and the whole-token bandwidth's share of the read limit
DECODE_GOALS = {"int4": 1.25, "fp8": 1.0, "bf16": 1.0}
BANDWIDTH_GOAL = 0.85


class Limit:
    """The prefetching read loop over one 2 GiB buffer (written once, so every page is touched), measured
    again between engines: the host's read bandwidth moves by tens of percent within minutes."""

    def __init__(self, threads: int, gib: float = 2.0):
        self.threads = threads
        self.buf = np.frombuffer(np.random.default_rng(0).bytes(int(gib * 2**30)), np.uint8)
        self.seen: list[float] = []

    def measure(self) -> float:
        from bench.kernels import read_bandwidth
        res = read_bandwidth(self.buf, self.threads, numpy_sum=False)
        self.seen.append(max(v for k, v in res.items() if "prefetch" in k))
        return self.seen[-1]


def token_bytes(cfg, experts: str, dense: str, dtype_bytes: int) -> int:
    """Weight bytes one decoded token reads on a CPU device: every dense tensor in its format as the kernels
    read it (hybrid.plan.perf.ModelCost, one embedding row) plus top-k routed experts per MoE layer."""
    from hybrid.core.placement import expert_host_bytes
    from hybrid.plan.perf import ModelCost
    dense_read = ModelCost.of(cfg, dtype_bytes, experts, dense=dense, dense_decoded=False).device_read_bytes
    return dense_read + cfg.num_experts_per_tok * len(cfg.moe_layers) * expert_host_bytes(cfg, experts)


def _median_spread(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), (max(xs) - min(xs)) / 2


def bench_ours(model: Path, fmt: str, dense: str, threads: int, dtype: str, prompt_lens, n_decode: int,
               repeats: int) -> dict:
    import torch

    import hybrid
    t0 = time.perf_counter()
    eng = hybrid.load(model, device="cpu", experts=fmt, dense=dense, threads=threads, dtype=dtype, prefetch="off")
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    V = eng.cfg.vocab_size
    eng.generate(rng.integers(0, V, 16).tolist(), 4, stop_ids=())     # warm-up: compile caches, touch pages
    res = {"load_s": load_s}
    for L in prompt_lens:
        rates = []
        for _ in range(repeats):
            eng.reset_stats()
            eng.generate(rng.integers(0, V, L).tolist(), 1, stop_ids=())
            rates.append(eng.stats().prefill_tokens_per_s)
        res[f"prefill{L}"] = _median_spread(rates)
    rates = []
    for _ in range(repeats):
        eng.reset_stats()
        eng.generate(rng.integers(0, V, 16).tolist(), n_decode, stop_ids=())
        rates.append(eng.stats().decode_tokens_per_s)
    res["decode"] = _median_spread(rates)
    res["bytes_per_token"] = token_bytes(eng.cfg, fmt, dense, torch.empty(0, dtype=eng.dtype).element_size())
    res["dense"] = dense
    del eng
    gc.collect()
    return res


def bench_llama(gguf: Path, threads: int, prompt_lens, n_decode: int, repeats: int, top_k: int, n_experts: int) -> dict:
    from llama_cpp import Llama
    llm = Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                yarn_beta_fast=1.0, yarn_beta_slow=1.0, type_k=0, type_v=0, verbose=False)
    rng = np.random.default_rng(1)
    V = llm.n_vocab()

    def run(prompt, n):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        return t_prefill, time.perf_counter() - t

    run(rng.integers(0, V, 16).tolist(), 4)
    res = {}
    for L in prompt_lens:
        res[f"prefill{L}"] = _median_spread([L / run(rng.integers(0, V, L).tolist(), 0)[0] for _ in range(repeats)])
    res["decode"] = _median_spread([n_decode / run(rng.integers(0, V, 16).tolist(), n_decode)[1]
                                    for _ in range(repeats)])
    res["bytes_per_token"] = _gguf_bytes_per_token(gguf, top_k, n_experts)
    llm.close()
    gc.collect()
    return res


def _gguf_bytes_per_token(path: Path, top_k: int, n_experts: int) -> int:
    from gguf import GGUFReader
    total = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name == "token_embd.weight":
            continue
        total += int(t.n_bytes) * top_k // n_experts if "_exps." in t.name else int(t.n_bytes)
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the bench model (hybrid make-tiny --preset bench)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours", default="int4,fp8,bf16")
    p.add_argument("--llama", default="q4_0,q8_0,bf16")
    p.add_argument("--gguf-dir", type=Path, help="where the exported GGUFs live (default: MODEL.gguf/)")
    p.add_argument("--prompt-lens", default="128,512")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="our device-side dtype on the CPU stand-in")
    p.add_argument("--dense", default="pair", help="our dense linears: pair (the experts' format) or one of "
                                                   "auto, int4, fp8, bf16, torch for every row")
    a = p.parse_args(argv)
    from hybrid.core.config import ModelConfig
    cfg = ModelConfig.from_file(a.model)
    lens = [int(x) for x in a.prompt_lens.split(",") if x]
    ours = [x for x in a.ours.split(",") if x]
    llamas = [x for x in a.llama.split(",") if x]
    have_llama = _have_llama()
    limit = Limit(a.threads)
    print(f"# load average at start {os.getloadavg()[0]:.2f} (the host is shared)", flush=True)
    rows = {}
    # each pair back to back (ours, then its llama.cpp peer): the host's read bandwidth moves within minutes
    order = [x for f in ours for x in [("ours", f)] + ([("llama.cpp", PAIRS[f])] if PAIRS.get(f) in llamas else [])]
    order += [("llama.cpp", q) for q in llamas if ("llama.cpp", q) not in order]
    for engine, fmt in order:
        if engine == "llama.cpp" and not have_llama:
            continue
        before = limit.measure()
        if engine == "ours":
            dense = fmt if a.dense == "pair" else a.dense
            r = bench_ours(a.model, fmt, dense, a.threads, a.dtype, lens, a.decode_tokens, a.repeats)
        else:
            r = bench_llama(_gguf(a, fmt), a.threads, lens, a.decode_tokens, a.repeats, cfg.num_experts_per_tok,
                            cfg.n_routed_experts)
        r["limit"] = (before, limit.measure())
        rows[f"{engine} {fmt}"] = r
        print(f"  {engine} {fmt} done (limit {before:.1f} / {r['limit'][1]:.1f} GB/s before / after)", flush=True)
    print(f"read limit (prefetching read loop, {a.threads} threads) across the run: "
          + ", ".join(f"{x:.1f}" for x in limit.seen) + " GB/s")
    print_table(rows, lens)
    print_goals(rows, lens)
    print(f"# load average at end {os.getloadavg()[0]:.2f}")


def _have_llama() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        print("  llama-cpp-python not installed: llama.cpp rows skipped (pip install -e .[bench], see "
              "bench/llama_build.md)")
        return False


def _gguf(a, q: str) -> Path:
    """The GGUF of a.model in type q, exported on first use."""
    from quant.gguf_export import export_gguf
    gdir = a.gguf_dir or a.model.with_name(a.model.name + ".gguf")
    gdir.mkdir(parents=True, exist_ok=True)
    path = gdir / f"{a.model.name}-{q}.gguf"
    if not path.exists():
        print(f"  exporting {path} ...", flush=True)
        export_gguf(a.model, path, q)
    return path


def _row_gbs(r: dict) -> tuple[float, float]:
    """(whole-token effective GB/s at the median decode rate, its share of the row's limit)."""
    gbs = r["bytes_per_token"] * r["decode"][0] / 1e9
    return gbs, gbs / statistics.mean(r["limit"])


def _peer(rows: dict, name: str) -> dict | None:
    return rows.get(f"llama.cpp {PAIRS[name.split()[1]]}") if name.startswith("ours ") else None


def print_table(rows: dict, lens) -> None:
    head = ["engine", "dense"] + [f"prefill {L} tok/s" for L in lens] + [
        "decode tok/s", "MB/token", "GB/s", "% limit", "ours/llama"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        dec, spread = r["decode"]
        gbs, share = _row_gbs(r)
        other, ratio = _peer(rows, name), ""
        if other:
            ratio = f"{dec / other['decode'][0]:.2f}x decode, " + ", ".join(
                f"{r[f'prefill{L}'][0] / other[f'prefill{L}'][0]:.2f}x pp{L}" for L in lens)
        cells = [name, r.get("dense", "as exported")] + [
            f"{r[f'prefill{L}'][0]:.1f} ± {r[f'prefill{L}'][1]:.1f}" for L in lens] + [
            f"{dec:.2f} ± {spread:.2f}", f"{r['bytes_per_token'] / 1e6:.0f}", f"{gbs:.1f}", f"{100 * share:.0f} %", ratio]
        print("| " + " | ".join(cells) + " |")


def print_goals(rows: dict, lens) -> None:
    """One line per goal of issue 14: decode against llama.cpp per pair, prefill ahead, whole-token bandwidth."""
    for name, r in rows.items():
        if not name.startswith("ours "):
            continue
        fmt, other = name.split()[1], _peer(rows, name)
        _, share = _row_gbs(r)
        print(f"goal {fmt}: whole-token bandwidth {100 * share:.0f} % of the read limit (goal >= "
              f"{100 * BANDWIDTH_GOAL:.0f} %): {'met' if share >= BANDWIDTH_GOAL else 'NOT met'}")
        if other:
            d = r["decode"][0] / other["decode"][0]
            ahead = all(r[f"prefill{L}"][0] > other[f"prefill{L}"][0] for L in lens)
            print(f"goal {fmt}: decode {d:.2f}x llama.cpp {PAIRS[fmt]} (goal >= {DECODE_GOALS[fmt]:.2f}x): "
                  f"{'met' if d >= DECODE_GOALS[fmt] else 'NOT met'}; prefill ahead at every length: "
                  f"{'yes' if ahead else 'NO'}")


if __name__ == "__main__":
    main()
