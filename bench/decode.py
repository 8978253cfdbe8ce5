"""End-to-end prefill and decode: our engine (INT4 / FP8 / BF16 experts) against llama.cpp on the same weights.

    python -m bench.decode --model BENCH_DIR [--threads 2] [--ours int4,fp8,bf16] [--llama q4_0,q8_0,bf16]

In one run: this machine's read bandwidth (the prefetching read loop of bench.kernels), then for each
engine prompt processing at 128 and 512 tokens and greedy decode of 64 tokens, repeated; the table gives the
median and spread, the bytes of weights one decoded token reads, the effective bandwidth, its share of the
limit, and our/llama.cpp ratios (int4~q4_0, fp8~q8_0, bf16~bf16). llama.cpp runs through llama-cpp-python on
GGUFs exported from the same checkpoint by `hybrid-quant export-gguf` (made on first use in --gguf-dir), with
yarn_beta_fast/slow = 1 (llama.cpp ignores the GGUF's keys; K2 needs 1/1) and an f32 KV cache.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import numpy as np

PAIRS = {"int4": "q4_0", "fp8": "q8_0", "bf16": "bf16"}


def limit_gbs(threads: int, gib: float = 2.0) -> float:
    from bench.kernels import read_bandwidth
    buf = np.frombuffer(np.random.default_rng(0).bytes(int(gib * 2**30)), np.uint8)
    res = read_bandwidth(buf, threads, numpy_sum=False)
    return max(v for k, v in res.items() if "prefetch" in k)


def _median_spread(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), (max(xs) - min(xs)) / 2


def bench_ours(model: Path, fmt: str, threads: int, dtype: str, prompt_lens, n_decode: int, repeats: int) -> dict:
    import hybrid
    from hybrid.core.placement import expert_host_bytes
    t0 = time.perf_counter()
    eng = hybrid.load(model, device="cpu", experts=fmt, threads=threads, dtype=dtype, prefetch="off")
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
            rates.append(eng.stats()["prefill_tokens_per_s"])
        res[f"prefill{L}"] = _median_spread(rates)
    rates = []
    for _ in range(repeats):
        eng.reset_stats()
        eng.generate(rng.integers(0, V, 16).tolist(), n_decode, stop_ids=())
        rates.append(eng.stats()["decode_tokens_per_s"])
    res["decode"] = _median_spread(rates)
    cfg, plan = eng.cfg, eng.plan
    embed = cfg.vocab_size * cfg.hidden_size * plan.compute_dtype_bytes   # a lookup reads one row, not the table
    res["bytes_per_token"] = (plan.dense_bytes - embed + cfg.num_experts_per_tok * len(cfg.moe_layers)
                              * expert_host_bytes(cfg, fmt))
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
    a = p.parse_args(argv)
    from hybrid.core.config import ModelConfig
    cfg = ModelConfig.from_file(a.model)
    lens = [int(x) for x in a.prompt_lens.split(",") if x]
    ours = [x for x in a.ours.split(",") if x]
    llamas = [x for x in a.llama.split(",") if x]
    limit = limit_gbs(a.threads)
    print(f"read bandwidth limit (prefetching read loop, {a.threads} threads): {limit:.1f} GB/s", flush=True)
    rows = {}
    for fmt in ours:
        rows[f"ours {fmt}"] = bench_ours(a.model, fmt, a.threads, a.dtype, lens, a.decode_tokens, a.repeats)
        print(f"  ours {fmt} done (load {rows[f'ours {fmt}']['load_s']:.0f} s)", flush=True)
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
        print("  llama-cpp-python not installed: llama.cpp rows skipped (pip install -e .[bench], see "
              "bench/llama_build.md)")
    if have_llama:
        from quant.gguf_export import export_gguf
        gdir = a.gguf_dir or a.model.with_name(a.model.name + ".gguf")
        gdir.mkdir(parents=True, exist_ok=True)
        for q in llamas:
            path = gdir / f"{a.model.name}-{q}.gguf"
            if not path.exists():
                print(f"  exporting {path} ...", flush=True)
                export_gguf(a.model, path, q)
            rows[f"llama.cpp {q}"] = bench_llama(path, a.threads, lens, a.decode_tokens, a.repeats,
                                                 cfg.num_experts_per_tok, cfg.n_routed_experts)
            print(f"  llama.cpp {q} done", flush=True)
    print_table(rows, lens, limit)


def print_table(rows: dict, lens, limit: float) -> None:
    head = ["engine"] + [f"prefill {L} tok/s" for L in lens] + ["decode tok/s", "MB/token", "GB/s", "% limit", "ours/llama"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        dec, spread = r["decode"]
        gbs = r["bytes_per_token"] * dec / 1e9
        ratio = ""
        if name.startswith("ours "):
            other = rows.get(f"llama.cpp {PAIRS[name.split()[1]]}")
            if other:
                ratio = f"{dec / other['decode'][0]:.2f}x decode, " + ", ".join(
                    f"{r[f'prefill{L}'][0] / other[f'prefill{L}'][0]:.2f}x pp{L}" for L in lens)
        cells = [name] + [f"{r[f'prefill{L}'][0]:.1f} ± {r[f'prefill{L}'][1]:.1f}" for L in lens] + [
            f"{dec:.2f} ± {spread:.2f}", f"{r['bytes_per_token'] / 1e6:.0f}", f"{gbs:.1f}", f"{100 * gbs / limit:.0f} %", ratio]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
