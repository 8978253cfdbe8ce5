"""The planner against a measured run: predicted vs measured decode (and prefill) time on this machine.

    python -m bench.plan --model BENCH_DIR [--calibration FILE] [--budgets 0,10%,25%] [--policies static,router]

1. Calibrate this machine (`hybrid plan --calibrate`), unless --calibration names an existing file.
2. Record the routing of R prompts on the bench model (no hot set), as `hybrid profile record` would.
3. For each hot-set budget and policy: the plan's prediction (hybrid.plan.planner with the calibrated local
   machine, the recorded trace replayed through the policy) and a measured run of the same prompts.
The "GPU" here is torch on the same CPU (float32), so the hot set costs time rather than saving it; what is
tested is whether the model of the runtime (bytes over measured rates, fixed costs, copies) predicts it.
Decode time per token = decode seconds / forward steps (the first new token comes from the prefill).
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

from bench.hotset import prompts, run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--calibration", type=Path, help="reuse this calibration (default: measure now)")
    p.add_argument("--budgets", default="0,10%,25%")
    p.add_argument("--policies", default="static,router")
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    import hybrid
    from hybrid.plan.calibrate import calibrate, load_calibration
    from hybrid.plan.hardware import local_machine
    from hybrid.core.knobs import HotSetSize, TransferBudget
    from hybrid.plan.planner import PlanRequest, make_plan
    from hybrid.profile.report import write_placement
    from hybrid.profile.trace import record
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    cfg = hybrid.ModelConfig.from_file(a.model)
    cal_path = a.calibration if a.calibration and a.calibration.is_file() else \
        calibrate(a.calibration or work / "calibration.json", device="cpu", threads=a.threads, configs=[cfg])
    machine = local_machine(load_calibration(cal_path), cfg)
    ps = prompts(cfg.vocab_size, a.requests, a.prompt_tokens)
    eng = hybrid.load(a.model, device="cpu", experts="fp8", threads=a.threads, prefetch="off")
    trace = record(eng, ps, a.new_tokens, stop_ids=())
    del eng
    gc.collect()
    context = a.prompt_tokens + a.new_tokens // 2           # mean KV length over the decode steps
    print(f"# {a.requests} requests x ({a.prompt_tokens} prompt + {a.new_tokens} new tokens), fp8 experts, "
          f"{a.threads} threads, calibration {cal_path}")
    print("| budget | policy | experts/layer | hits, all tokens (replay / run) | copies (replay / run) "
          "| decode ms/token predicted | measured | predicted/measured | prefill s predicted | measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for budget in [b for b in a.budgets.split(",") if b]:
        pols = ["none"] if budget in ("0", "0%") else [x for x in a.policies.split(",") if x]
        for pol in pols:
            place = None
            if pol == "static":
                place = work / f"placement-{budget.rstrip('%')}.json"
                write_placement(place, trace, float(budget.rstrip("%")) / 100)
            got = run(a.model, 0 if pol == "none" else budget, pol, ps, a.new_tokens, a.threads, place)
            plan = make_plan(PlanRequest(cfg, str(a.model), machine, "fp8", context, trace,
                                         hot_set=HotSetSize.experts(got["capacity"]), prompt_tokens=a.prompt_tokens,
                                         policies=() if pol == "none" else (pol,), transfer=TransferBudget("auto")))
            row = plan.rows[-1]
            pred = row["decode_full_context"]["seconds"]          # at `context`: the mean KV length of decode
            pred_loads = (row["decode_copies_per_token_layer"] * a.new_tokens +
                          row["prefill_copies_per_token_layer"] * a.prompt_tokens) * plan.moe_layers * a.requests
            hit = (row["decode_hit_rate"] * a.new_tokens + row["prefill_hit_rate"] * a.prompt_tokens) / \
                (a.new_tokens + a.prompt_tokens)
            ratio = pred / got["decode_s_per_step"]
            worst = max(worst, abs(ratio - 1))
            print(f"| {budget} | {pol} | {got['capacity']} | {100 * hit:.1f} % / "
                  f"{100 * got['hit']:.1f} % | {pred_loads:.0f} / {got['loads']:.0f} | {1e3 * pred:.1f} | "
                  f"{1e3 * got['decode_s_per_step']:.1f} | {ratio:.2f} | {row['prefill']['seconds']:.2f} | "
                  f"{got['prefill_s']:.2f} |", flush=True)
    print(f"# largest decode error: {100 * worst:.0f} % (goal: within 20 %)")


if __name__ == "__main__":
    main()
