"""Where one decode (or prefill) step's time goes, by component, on a CPU device: wall time per step and, for the
parts that read weights, the bytes they read and the GB/s that makes.

    python -m bench.profile_step --model BENCH_DIR [--experts int4] [--dense int4] [--phase decode|prefill]
                                 [--threads 2] [--tokens 64] [--prompt 512]

Why not cProfile: it adds ~1 us to each of the ~2,000 Python calls of a bench-model step and reports time per
function, not per component of the model; here a dozen methods of the runtime are wrapped with a timer (a few
tenths of a microsecond each) for the steps of the chosen phase only. Components nest (dashes: the
layer tree; attention holds the packed linears it calls): read the table as a tree, not as a sum. The routed experts' GB/s come from the CPU
kernels' own counters. The host is shared: compare components within one run.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path


class Timers:
    """Wall time, calls and weight bytes per component, counted only while `on`."""

    def __init__(self):
        self.on = False
        self.order: list[str] = []                  # components in the order they were wrapped (the tree)
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self.bytes, self.flops = defaultdict(int), defaultdict(int)

    def wrap(self, owner, name: str, key: str, work=None) -> None:
        """Replace owner.name with a timed call; work(module, x) -> (weight bytes, FLOPs) of one call."""
        f = getattr(owner, name)
        if key not in self.order:
            self.order.append(key)

        def timed(*a, **k):
            if not self.on:
                return f(*a, **k)
            t = time.perf_counter()
            out = f(*a, **k)
            self.seconds[key] += time.perf_counter() - t
            self.calls[key] += 1
            if work is not None:
                b, fl = work(*a[:2])
                self.bytes[key] += b
                self.flops[key] += fl
            return out
        setattr(owner, name, timed)


def instrument(timers: Timers, phase: str) -> None:
    """Wrap the runtime's components; the engine's per-step thread choice switches the timers on for `phase`."""
    import cpu_experts.moe as cpu_moe
    import gpu_attn.norm as norm
    import gpu_attn.router as router
    import hybrid.runtime.dense as dense
    import hybrid.runtime.engine as engine
    import hybrid.runtime.model as model
    import hybrid.runtime.moe as moe
    w = timers.wrap
    w(model.K2Model, "hidden", "all layers")
    w(model.DecoderLayer, "forward", "- layers")
    w(model, "paged_attention", "-- attention (its norm excluded)")
    w(moe.MoE, "forward", "-- MoE block (router, experts, shared expert)")
    w(cpu_moe.CpuMoE, "_forward", "--- routed experts (CPU kernels)")
    w(router.Router, "forward", "--- router")
    w(dense.CpuMLP, "forward", "packed MLPs (shared expert, dense MLP)",
      lambda m, x: (m.op.nbytes, 6 * x.shape[0] * m.op.hidden * m.op.inter))
    w(dense.CpuLinear, "forward", "packed linears (q, kv_a, o, lm_head)", lambda m, x: _linear(m.op.w, x.shape[0]))
    w(dense.CpuKVUp, "absorb_q", "kv_b absorbed (q and o)", lambda m, x: _linear(m.uk_t.w, x.shape[0]))
    w(dense.CpuKVUp, "absorb_o", "kv_b absorbed (q and o)", lambda m, x: _linear(m.uv.w, x.shape[1]))
    w(norm.RMSNorm, "forward", "RMSNorm")
    w(model.K2Model, "logits", "lm_head")
    threads_for = engine.Engine._threads_for

    def switch(eng, step_phase):
        timers.on = step_phase == phase
        return threads_for(eng, step_phase)
    engine.Engine._threads_for = switch


def _linear(w, tokens: int) -> tuple[int, int]:
    """(bytes, FLOPs) of one packed matrix (all its groups) applied to `tokens` tokens."""
    return w.nbytes, 2 * tokens * w.groups * w.rows * w.cols


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--experts", default="int4")
    p.add_argument("--dense", default=None, help="default: the experts' format")
    p.add_argument("--phase", default="decode", choices=["decode", "prefill"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=64, help="decode: tokens generated")
    p.add_argument("--prompt", type=int, default=512, help="prefill: prompt tokens")
    a = p.parse_args(argv)
    import hybrid
    from bench.decode import Limit
    limit = Limit(a.threads).measure()
    timers = Timers()
    instrument(timers, a.phase)
    dense = a.dense or a.experts
    eng = hybrid.load(a.model, device="cpu", experts=a.experts, dense=dense, threads=a.threads, dtype=a.dtype,
                      prefetch="off")
    eng.generate([1, 2, 3, 4], 8, stop_ids=())                       # warm-up
    timers.reset()
    eng.reset_stats()
    prompt = list(range(10, 10 + (16 if a.phase == "decode" else a.prompt)))
    eng.generate(prompt, a.tokens if a.phase == "decode" else 1, stop_ids=())
    report(timers, eng, a, dense, limit)


def report(timers: Timers, eng, a, dense: str, limit: float) -> None:
    s, k = eng.stats(), eng.experts.stats().cpu
    steps = max(1, timers.calls["all layers"])
    rate = s.decode_tokens_per_s if a.phase == "decode" else s.prefill_tokens_per_s
    print(f"# {a.experts} experts, dense {dense}, {a.threads} threads, {a.phase}: {rate:.2f} tok/s; "
          f"{steps} steps; load average {os.getloadavg()[0]:.2f}")
    cfg = eng.cfg
    expert_flops = 6 * cfg.hidden_size * cfg.moe_intermediate_size * k.activations
    print(f"# read limit (prefetching read loop) just before: {limit:.1f} GB/s; CPU expert kernels (whole run, "
          f"prefill included): {k.bytes_read / 1e9:.2f} GB, {expert_flops / 1e9:.0f} GFLOP in {k.seconds:.2f} s = "
          f"{k.bytes_read / max(k.seconds, 1e-9) / 1e9:.1f} GB/s, {expert_flops / max(k.seconds, 1e-9) / 1e9:.0f} GFLOP/s")
    print("| component | ms/step | calls/step | MB/step | GB/s | GFLOP/s |\n|---|---|---|---|---|---|")
    for key in timers.order:
        sec = timers.seconds[key]
        if not timers.calls[key]:
            continue
        mb = timers.bytes[key] / steps / 1e6
        gbs = f"{timers.bytes[key] / sec / 1e9:.1f}" if timers.bytes[key] else ""
        gfl = f"{timers.flops[key] / sec / 1e9:.0f}" if timers.flops[key] else ""
        print(f"| {key} | {1e3 * sec / steps:.2f} | {timers.calls[key] / steps:.1f} | {f'{mb:.1f}' if mb else ''} "
              f"| {gbs} | {gfl} |")


if __name__ == "__main__":
    main()
