"""The device hot set on the bench model: share of expert activations it serves, and decode tokens/s, for
each policy at 10 % and 25 % of the experts and each hot-set format, against no hot set, in one run; first,
what one hot-set hit costs packed (decoded per use) against bf16 (dequantized once) on one K2-shaped expert.

    python -m bench.hotset --model BENCH_DIR [--budgets 10%,25%] [--policies static,lru,lfu,router]
                           [--hot-set-formats bf16,packed] [--hit-tokens 1,32] [--hit-formats fp8,int4]

Budgets are shares of the experts, so both formats hold the same experts per layer, make the same decisions
and serve the same activations: the "vs bf16" column is the cost of the packed form alone. On the CPU
stand-in a "bf16" hot set holds float32 weights (the device dtype there), and a packed hit is decoded by
cpu_experts' Numba dequant_rows into one reused buffer before the same torch matmuls.

The static placement comes from a routing trace of the same prompts recorded first (what `hybrid profile`
would write), so static is an upper bound on what a profile can give. On a machine without CUDA the
"device" is the CPU: resident experts are dequantized float32 torch weights and a copy is a real memory
copy, so tokens/s here says what the bookkeeping costs, not what a GPU would gain; the hit rates carry over.
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(n)]


def _best_of(fns: dict, rounds: int) -> dict:
    """{name: best seconds} of each function, called in turn within each round (the host is shared: a slow
    spell slows all of them alike, so their ratios hold better than those of separate runs)."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()                                              # warm-up (Numba, allocator)
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def hit_cost(fmt: str, tokens: int, threads: int, rounds: int = 7) -> dict:
    """Seconds of one hot-set hit (mix_experts over `tokens` tokens routed to one K2-shaped expert, random codes)
    with the expert kept bf16 (dequantized: float32 on the CPU) and packed (decoded into the buffer per use),
    and of the decode alone; `same` says whether the two outputs are bit-identical."""
    import torch
    from cpu_experts.measure import random_store
    from hybrid.runtime.expert_copy import DecodeBuffer, ExpertCopier
    from hybrid.runtime.experts import mix_experts
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    store = random_store(fmt, 1, np.random.default_rng(0))
    copier = ExpertCopier(cpu)
    packed, weights = copier.packed(store, 0), copier.dequantized(store, 0, torch.float32)
    buf = DecodeBuffer(store.spec, cpu, torch.float32)
    h = torch.randn(tokens, store.spec.hidden, generator=torch.Generator().manual_seed(0))
    ids, w = torch.zeros(tokens, 1, dtype=torch.int64), torch.ones(tokens, 1)
    mask = np.ones((tokens, 1), bool)

    def run_with(weights_of):
        return mix_experts(h, ids, w, mask, ids.numpy(), weights_of)
    same = torch.equal(run_with(lambda e: weights), run_with(lambda e: buf.weights(packed)))
    return {**_best_of({"bf16": lambda: run_with(lambda e: weights),
                        "packed": lambda: run_with(lambda e: buf.weights(packed)),
                        "decode": lambda: buf.weights(packed)}, rounds), "same": same}


def text_prompts(tok, path: Path, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens: consecutive windows of the text file, encoded by the model's tokenizer
    (for trained models, whose routing on random tokens says little)."""
    ids = tok.encode(path.read_text(encoding="utf-8"))
    if len(ids) < n * length:
        raise ValueError(f"{path} holds {len(ids)} tokens; {n} prompts of {length} need {n * length}")
    step = len(ids) // n
    return [ids[i * step:i * step + length] for i in range(n)]


def run(model: Path, budget, policy: str, ps, new_tokens: int, threads: int, placement=None,
        hot_set_format: str = "auto") -> dict:
    import hybrid
    eng = hybrid.load(model, device="cpu", experts="fp8", gpu_expert_budget=budget, threads=threads,
                      prefetch="off" if budget == 0 else policy, placement=placement, hot_set_format=hot_set_format)
    eng.generate(ps[0][:16], 2, stop_ids=())           # warm-up
    eng.reset_stats()
    for p in ps:
        eng.generate(p, new_tokens, stop_ids=())
    s = eng.stats()
    act = s.expert_activations
    hot = s.expert_backend.hot_set           # None without a hot set
    steps = s.decode_tokens - len(ps)          # forward steps: each request's first token comes from prefill
    out = {"hit": act.hot_set / act.total, "decode": s.decode_tokens_per_s,
           "decode_s_per_step": s.decode_seconds / max(1, steps), "prefill_s": s.prefill_seconds / len(ps),
           "capacity": eng.plan.experts_per_layer, "loads": hot.loads if hot else 0,
           "copied_gib": hot.bytes_copied / 2**30 if hot else 0.0,
           "device_s": hot.device_seconds if hot else 0.0,
           "lookahead": hot.lookahead_precision[1] if hot else None}
    del eng
    gc.collect()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--budgets", default="10%,25%")
    p.add_argument("--policies", default="static,lru,lfu,router")
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hot-set-formats", default="bf16,packed", help="hot-set formats to run, each budget and policy")
    p.add_argument("--hit-tokens", default="1,32", help="tokens per hit in the one-expert cost table ('' skips it)")
    p.add_argument("--hit-formats", default="fp8,int4", help="store formats of the one-expert cost table")
    p.add_argument("--text", type=Path, help="prompts from this text file (model's tokenizer) instead of random ids")
    a = p.parse_args(argv)
    print(f"# load average at start {os.getloadavg()[0]:.2f} (the host is shared: compare rows of one run)")
    print_hit_costs(a)
    if not [x for x in a.budgets.split(",") if x]:
        return                                           # --budgets '': the one-expert table alone
    import hybrid
    from hybrid.profile.report import write_placement
    from hybrid.profile.trace import record
    cfg = hybrid.ModelConfig.from_file(a.model)
    eng = hybrid.load(a.model, device="cpu", experts="fp8", threads=a.threads, prefetch="off")
    ps = (text_prompts(eng.tokenizer, a.text, a.requests, a.prompt_tokens) if a.text
          else prompts(cfg.vocab_size, a.requests, a.prompt_tokens))
    trace = record(eng, ps, a.new_tokens, stop_ids=())
    del eng
    gc.collect()
    work = Path(tempfile.mkdtemp(prefix="bench-hotset-"))
    base = run(a.model, 0, "off", ps, a.new_tokens, a.threads)
    print(f"no hot set: decode {base['decode']:.2f} tok/s")
    print("| policy | budget | hot-set format | experts/layer | served by hot set | decode tok/s | vs no hot set | "
          "vs bf16 hot set | hot-set device s | loads | copied GiB | look-ahead L+1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for budget in [b for b in a.budgets.split(",") if b]:
        frac = float(budget.rstrip("%")) / 100
        place = work / f"placement-{budget.rstrip('%')}.json"
        write_placement(place, trace, frac)
        for pol in [x for x in a.policies.split(",") if x]:
            bf16 = None
            for form in [f for f in a.hot_set_formats.split(",") if f]:
                r = run(a.model, budget, pol, ps, a.new_tokens, a.threads, place if pol == "static" else None, form)
                bf16 = r if form == "bf16" else bf16
                la = "n/a" if r["lookahead"] is None else f"{100 * r['lookahead']:.0f} %"
                vs = f"{r['decode'] / bf16['decode']:.2f}x" if bf16 else "n/a"
                print(f"| {pol} | {budget} | {form} | {r['capacity']} | {100 * r['hit']:.1f} % | {r['decode']:.2f} | "
                      f"{r['decode'] / base['decode']:.2f}x | {vs} | {r['device_s']:.2f} | {r['loads']:.0f} | "
                      f"{r['copied_gib']:.2f} | {la} |", flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.2f}")


def print_hit_costs(a) -> None:
    """The one-expert table: ms per hit bf16 and packed, in the same run."""
    tokens = [int(t) for t in a.hit_tokens.split(",") if t]
    if not tokens:
        return
    print(f"one hot-set hit on a K2-shaped expert (7168 x 2048), {a.threads} threads, best of 7, interleaved:")
    print("| store format | tokens | bf16 hit ms | packed hit ms | packed / bf16 | of which decode ms | identical |")
    print("|---|---|---|---|---|---|---|")
    for fmt in [f for f in a.hit_formats.split(",") if f]:
        for t in tokens:
            c = hit_cost(fmt, t, a.threads)
            print(f"| {fmt} | {t} | {1e3 * c['bf16']:.2f} | {1e3 * c['packed']:.2f} | {c['packed'] / c['bf16']:.2f}x | "
                  f"{1e3 * c['decode']:.2f} | {'yes' if c['same'] else 'NO'} |", flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
