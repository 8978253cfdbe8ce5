"""The device hot set on the bench model: share of expert activations it serves, and decode tokens/s, for
each policy at 10 % and 25 % of the experts, against no hot set, in one run.

    python -m bench.hotset --model BENCH_DIR [--budgets 10%,25%] [--policies static,lru,lfu,router]

The static placement comes from a routing trace of the same prompts recorded first (what `hybrid profile`
would write), so static is an upper bound on what a profile can give. On a machine without CUDA the
"device" is the CPU: resident experts are dequantized float32 torch weights and a copy is a real memory
copy, so tokens/s here says what the bookkeeping costs, not what a GPU would gain; the hit rates carry over.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import numpy as np


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(n)]


def text_prompts(tok, path: Path, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens: consecutive windows of the text file, encoded by the model's tokenizer
    (for trained models, whose routing on random tokens says little)."""
    ids = tok.encode(path.read_text(encoding="utf-8"))
    if len(ids) < n * length:
        raise ValueError(f"{path} holds {len(ids)} tokens; {n} prompts of {length} need {n * length}")
    step = len(ids) // n
    return [ids[i * step:i * step + length] for i in range(n)]


def run(model: Path, budget, policy: str, ps, new_tokens: int, threads: int, placement=None) -> dict:
    import hybrid
    eng = hybrid.load(model, device="cpu", experts="fp8", gpu_expert_budget=budget, threads=threads,
                      prefetch="off" if budget == 0 else policy, placement=placement)
    eng.generate(ps[0][:16], 2, stop_ids=())           # warm-up
    eng.reset_stats()
    for p in ps:
        eng.generate(p, new_tokens, stop_ids=())
    s = eng.stats()
    act = s["expert_activations"]
    backend = s["expert_backend"]
    steps = s["decode_tokens"] - len(ps)          # forward steps: each request's first token comes from prefill
    out = {"hit": act["hot_set"] / act["total"], "decode": s["decode_tokens_per_s"],
           "decode_s_per_step": s["decode_seconds"] / max(1, steps), "prefill_s": s["prefill_seconds"] / len(ps),
           "capacity": eng.plan.experts_per_layer, "loads": backend.get("loads", 0),
           "copied_gib": backend.get("bytes_copied", 0) / 2**30,
           "lookahead": backend.get("lookahead_L+1_precision")}
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
    p.add_argument("--text", type=Path, help="prompts from this text file (model's tokenizer) instead of random ids")
    a = p.parse_args(argv)
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
    print("| policy | budget | experts/layer | served by hot set | decode tok/s | vs no hot set | loads | copied GiB | look-ahead L+1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for budget in [b for b in a.budgets.split(",") if b]:
        frac = float(budget.rstrip("%")) / 100
        place = work / f"placement-{budget.rstrip('%')}.json"
        write_placement(place, trace, frac)
        for pol in [x for x in a.policies.split(",") if x]:
            r = run(a.model, budget, pol, ps, a.new_tokens, a.threads, place if pol == "static" else None)
            la = "n/a" if r["lookahead"] is None else f"{100 * r['lookahead']:.0f} %"
            print(f"| {pol} | {budget} | {r['capacity']} | {100 * r['hit']:.1f} % | {r['decode']:.2f} | "
                  f"{r['decode'] / base['decode']:.2f}x | {r['loads']:.0f} | {r['copied_gib']:.2f} | {la} |", flush=True)


if __name__ == "__main__":
    main()
