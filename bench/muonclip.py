"""Muon against MuonClip on the tiny K2 configuration: does QK-Clip keep attention logits bounded, and
at what cost in loss? (The Kimi K2 report: MuonClip kept max logits at tau = 100 through 15.5 T tokens
with no loss spike, where Muon's grew past 1000.)

    python -m bench.muonclip [--steps 150] [--lr 0.02] [--tau 30] [--out bench-muonclip]

Trains the same model three times from the same seed on the same batches (the shipped recipe's data): with
Muon (+ AdamW for embeddings, head and norms); with MuonClip as the K2 report specifies it (the same, then
QK-Clip with each head's max logit from the step's forward); and with MuonClip re-measuring the max logits
on the updated weights before clipping (one more no-grad forward per step; train/qk_clip.py). The
learning rate is raised above the shipped recipe's (2e-3) to make attention logits grow within a few
hundred steps, and tau is scaled down from K2's 100 to suit a 4-head, 256-wide model whose logits start
near 10. Each step records the largest pre-softmax logit of the step's forward (what QK-Clip reads) and,
with one more float32 forward of the same batch, the largest logit after the step (after the clip, for
MuonClip). Writes muonclip.png (both max logits and the loss per step, all runs) and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from hybrid.core.config import ModelConfig
from train.data import build_dataset
from train.loop import model_config
from train.model import TrainModel
from train.optim import MuonClip
from train.recipes import RECIPES
from train.step import Schedule, train_step

# (label, QK-Clip on, where its max logits come from)
RUNS = (("Muon", False, "forward"), ("MuonClip", True, "forward"), ("MuonClip-after", True, "after_step"))


def run(cfg: ModelConfig, ds, optim, sched: Schedule, label: str, quiet: bool) -> list[dict]:
    """Train one model; per step: loss, forward max logit, max logit after the step, clipped heads."""
    model = TrainModel(cfg, sched.seed)
    opt = MuonClip(model, optim)
    rows, t = [], time.perf_counter()
    for step in range(sched.steps):
        batch = ds.batch(sched.seed, step, sched.batch, sched.seq)
        st = train_step(model, opt, batch, step, optim.lr * sched.lr_scale(step), sched.balance_u, sched.bf16)
        with torch.no_grad():            # float32: the logits the weights really give
            after = max(float(m.max()) for m in model(batch[:, :-1])[1].max_logits)
        rows.append({"step": step, "loss": st.loss, "max_logit": st.max_logit, "after": after,
                     "clipped": st.clipped_heads})
        if not quiet and (step + 1) % 50 == 0:
            print(f"  {label} step {step + 1}/{sched.steps}: loss {st.loss:.3f} max logit {st.max_logit:.1f} "
                  f"({(step + 1) / (time.perf_counter() - t):.2f} steps/s)", file=sys.stderr, flush=True)
    return rows


def plot(path: Path, runs: dict[str, list[dict]], tau: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.2))
    for label, rows in runs.items():
        steps = [r["step"] + 1 for r in rows]
        a.plot(steps, [r["max_logit"] for r in rows], label=label)
        b.plot(steps, [r["after"] for r in rows], label=label)
        c.plot(steps, [r["loss"] for r in rows], label=label, alpha=0.8)
    for ax in (a, b):
        ax.axhline(tau, color="gray", linestyle="--", label=f"tau = {tau:g}")
    a.set(xlabel="step", ylabel="max pre-softmax logit, any head", title="in the step's forward (QK-Clip's input)")
    b.set(xlabel="step", ylabel="max pre-softmax logit, any head", title="after the step, same batch (float32)")
    c.set(xlabel="step", ylabel="training loss", title="loss")
    for ax in (a, b, c):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(runs: dict[str, list[dict]], every: int) -> str:
    """Per `every` steps and run: loss, forward max logit, max logit after the step (same batch)."""
    head = "| step | " + " | ".join(f"{k}: loss, max logit (forward / after step)" for k in runs) + " |"
    lines = [head, "|---|" + "---|" * len(runs)]
    n = len(next(iter(runs.values())))
    for i in sorted({*range(every - 1, n, every), n - 1}):
        cells = [f"{r[i]['loss']:.3f}, {r[i]['max_logit']:.1f} / {r[i]['after']:.1f}" for r in runs.values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(runs: dict[str, list[dict]], tau: float, tail: int = 20) -> str:
    """Per run: largest max logit (forward and after-step), steps over tau, final loss; loss ratios."""
    out = []
    for label, rows in runs.items():
        over = [r["step"] + 1 for r in rows if r["after"] > tau * (1 + 1e-5)]     # float32 rounding
        final = sum(r["loss"] for r in rows[-tail:]) / min(tail, len(rows))
        out.append(f"{label}: largest forward max logit {max(r['max_logit'] for r in rows):.2f}, after-step "
                   f"{max(r['after'] for r in rows):.2f}; after-step max logit > tau at {len(over)} of {len(rows)} "
                   f"steps{f' (first at step {over[0]})' if over else ''}; mean loss of the last {tail} steps {final:.4f}; "
                   f"heads clipped in total {sum(r['clipped'] for r in rows)}")
    final = {k: sum(r["loss"] for r in rows[-tail:]) / min(tail, len(rows)) for k, rows in runs.items()}
    out += [f"final loss {k} / Muon = {v / final['Muon']:.4f}" for k, v in final.items() if k != "Muon"]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--tau", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench-muonclip"))
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if not a.tau > 0:
        p.error(f"--tau must be > 0, got {a.tau}")
    torch.set_num_threads(a.threads)
    recipe = RECIPES["tiny"]
    sched = Schedule(steps=a.steps, batch=a.batch, seq=a.seq, warmup=min(50, a.steps // 10), seed=0)
    with tempfile.TemporaryDirectory(prefix="bench-muonclip-") as tmp:
        ds = build_dataset(recipe.data, Path(tmp), quiet=a.quiet)
    cfg = ModelConfig.from_dict(model_config(recipe.model, recipe.data, sched.seq))
    runs, t0 = {}, time.perf_counter()
    for label, clip, source in RUNS:
        optim = dataclasses.replace(recipe.optim, lr=a.lr, tau=a.tau if clip else None, clip_source=source)
        runs[label] = run(cfg, ds, optim, sched, label, a.quiet)
    a.out.mkdir(parents=True, exist_ok=True)
    png = a.out / "muonclip.png"
    plot(png, runs, a.tau)
    print(f"# tiny K2 config ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, hidden "
          f"{cfg.hidden_size}), {a.steps} steps of {a.batch} x {a.seq} tokens, lr {a.lr}, tau {a.tau:g}, "
          f"{time.perf_counter() - t0:.0f} s; plot {png}")
    print(table(runs, max(1, a.steps // 10)))
    print(summary(runs, a.tau))
    return 0


if __name__ == "__main__":
    sys.exit(main())
