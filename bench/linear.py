"""Dense-layer benchmark: PackedLinear / PackedMLP per format against the read limit and torch's matmul.

    python -m bench.linear [--threads N] [--formats int4,fp8,bf16] [--models bench,k2] [--tokens 128]
                           [--pool-gib 1] [--calls 20] [--no-torch] [--no-prefill]

N = rows, K = inputs, T = tokens. For the bench model's and Kimi K2's dense shapes (q_a, q_b, kv_a, kv_b as
MLA's absorbed halves per head, o_proj, shared-expert and dense MLP, lm_head):
1. decode (T = 1): enough copies of each weight to fill --pool-gib (so every call reads cold memory),
   called in turn; effective bandwidth = weight bytes / time, as % of the prefetching read loop measured in
   the same run just before and after each format's rows; and torch's F.linear on the same shapes in bf16
   and float32 (what the runtime runs today: float32 on the CPU), time ratio ours / torch;
2. prefill (T = --tokens): GFLOP/s, ours against torch bf16 and f32 (lm_head skipped: a prefill needs only
   its last token's logits);
3. fixed cost per call: the tiny model's shapes (hidden 256, weights in cache), microseconds per call for
   each product of one MoE layer and their sum, against torch's F.linear on the same shapes.
Best of rounds everywhere: the host is shared, and other tenants only ever slow a round down. Compare
figures of one run only.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cpu_experts.linear import PackedLinear, PackedMLP
from cpu_experts.measure import GIB, random_packed, read_bandwidth
from cpu_experts.moe import physical_cores
from cpu_experts.pool import RowPool


@dataclass(frozen=True)
class Shape:
    name: str
    groups: int           # > 1: one matrix per head (MLA's absorbed kv_b halves)
    rows: int
    cols: int
    mlp: bool = False     # a SwiGLU MLP of inter `rows`, hidden `cols`: three matrices


def model_shapes(H: int, heads: int, q_lora: int, kv_lora: int, dn: int, dr: int, dv: int, shared: int, dense: int,
                 vocab: int) -> list[Shape]:
    return [Shape("q_a", 1, q_lora, H), Shape("q_b", 1, heads * (dn + dr), q_lora), Shape("kv_a", 1, kv_lora + dr, H),
            Shape("kv_b W_UK^T", heads, kv_lora, dn), Shape("kv_b W_UV", heads, dv, kv_lora),
            Shape("o_proj", 1, H, heads * dv), Shape("shared MLP", 1, shared, H, True),
            Shape("dense MLP", 1, dense, H, True), Shape("lm_head", 1, vocab, H)]


MODELS = {   # hidden_size, heads, q_lora, kv_lora, nope, rope, v, shared expert inter, dense inter, vocab
    "bench": model_shapes(7168, 8, 1536, 512, 128, 64, 128, 2048, 4096, 1024),        # hybrid/models/tiny.py
    "k2": model_shapes(7168, 64, 1536, 512, 128, 64, 128, 2048, 18432, 163840),       # docs/model.md
    "tiny": model_shapes(256, 4, 64, 32, 32, 16, 32, 128, 512, 1024),
}


class Ours:
    """The kernels for one shape: a PackedLinear or a PackedMLP, x and out buffers."""

    def __init__(self, s: Shape, fmt: str, rng, T: int):
        mats = [random_packed(fmt, s.groups, *rc, rng) for rc in
                ([(s.rows, s.cols), (s.rows, s.cols), (s.cols, s.rows)] if s.mlp else [(s.rows, s.cols)])]
        self.op = PackedMLP(*mats) if s.mlp else PackedLinear(mats[0])
        self.nbytes = sum(m.nbytes for m in mats)
        self.path = self.op.path
        xs = (T, s.cols) if s.groups == 1 else (T, s.groups, s.cols)
        self.x = rng.standard_normal(xs, dtype=np.float32) * 0.1
        self.out = np.empty((T, s.cols) if s.mlp else (T, s.rows) if s.groups == 1 else (T, s.groups, s.rows),
                            np.float32)

    def __call__(self, pool: RowPool) -> None:
        self.op.run(self.x, self.out, pool)


class Torch:
    """torch on the same shape: F.linear (bmm per head for a grouped one; three matmuls + SiLU for an MLP)."""

    def __init__(self, s: Shape, dtype, T: int):
        mk = lambda *sh: torch.randn(*sh, dtype=dtype) * 0.02          # noqa: E731
        self.s = s
        self.w = [mk(s.rows, s.cols), mk(s.rows, s.cols), mk(s.cols, s.rows)] if s.mlp else \
            [mk(s.rows, s.cols)] if s.groups == 1 else [mk(s.groups, s.rows, s.cols)]
        self.x = mk(T, s.cols) if s.groups == 1 else mk(s.groups, T, s.cols)
        self.nbytes = sum(w.numel() * w.element_size() for w in self.w)

    def __call__(self, pool=None) -> None:
        w, x = self.w, self.x
        with torch.inference_mode():
            if self.s.mlp:
                F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])
            elif self.s.groups == 1:
                F.linear(x, w[0])
            else:
                torch.bmm(x, w[0].transpose(1, 2))


def timed(ops: list, pool, calls: int, rounds: int = 3) -> float:
    """Best-of-rounds seconds per call, cycling through `ops` (copies of one product on distinct memory)."""
    for op in ops[:2]:
        op(pool)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(calls):
            ops[i % len(ops)](pool)
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def copies(nbytes: int, pool_gib: float) -> int:
    return max(1, int(-(-pool_gib * GIB // nbytes)))


def read_limit(buf: np.ndarray, threads: int) -> float:
    return max(v for k, v in read_bandwidth(buf, threads, False).items() if "prefetch" in k)


def decode_rows(a, fmt: str, shapes: list[Shape], pool, buf, rng) -> None:
    lim0 = read_limit(buf, a.threads)
    rows = []
    for s in shapes:
        one = Ours(s, fmt, rng, 1)
        ops = [one] + [Ours(s, fmt, rng, 1) for _ in range(copies(one.nbytes, a.pool_gib) - 1)]
        dt = timed(ops, pool, a.calls)
        ref = {}
        if not a.no_torch:
            for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
                t0 = Torch(s, dtype, 1)
                if t0.nbytes * copies(t0.nbytes, a.pool_gib) > a.torch_max_gib * GIB:
                    continue                                           # K2's lm_head in f32: 4.7 GB a copy
                tops = [t0] + [Torch(s, dtype, 1) for _ in range(copies(t0.nbytes, a.pool_gib) - 1)]
                ref[name] = timed(tops, None, a.calls)
                del tops
        rows.append((s, one.path, one.nbytes, dt, ref))
        del ops
    lim = (lim0 + read_limit(buf, a.threads)) / 2
    print(f"## decode, {fmt}: prefetching read loop {lim:.1f} GB/s ({a.threads} threads, before/after mean)")
    print("| shape | N x K (groups) | path | MB | us/call | GB/s | % of read loop | torch bf16 us | ours/torch bf16 "
          "| torch f32 us | ours/torch f32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    tot = {"ours": 0.0, "bf16": 0.0, "f32": 0.0, "bytes": 0}
    for s, path, nb, dt, ref in rows:
        tb, tf = ref.get("bf16"), ref.get("f32")
        cells = [f"{tb * 1e6:.0f}" if tb else "-", f"{dt / tb:.2f}" if tb else "-",
                 f"{tf * 1e6:.0f}" if tf else "-", f"{dt / tf:.2f}" if tf else "-"]
        print(f"| {s.name} | {s.rows} x {s.cols}" + (f" ({s.groups})" if s.groups > 1 else "") + (" MLP" if s.mlp else "")
              + f" | {path} | {nb / 1e6:.1f} | {dt * 1e6:.0f} | {nb / dt / 1e9:.1f} | {100 * nb / dt / 1e9 / lim:.0f} | "
              + " | ".join(cells) + " |")
        tot["ours"] += dt
        tot["bytes"] += nb
        for k in ("bf16", "f32"):
            tot[k] = tot[k] + ref[k] if k in ref and tot[k] is not None else None
    print(f"all shapes: {tot['bytes'] / 1e6:.0f} MB in {tot['ours'] * 1e3:.2f} ms = {tot['bytes'] / tot['ours'] / 1e9:.1f} GB/s "
          f"= {100 * tot['bytes'] / tot['ours'] / 1e9 / lim:.0f} % of the read loop" +
          "".join(f"; torch {k} {tot[k] * 1e3:.2f} ms (ours/torch {tot['ours'] / tot[k]:.2f})" for k in ("bf16", "f32")
                  if tot[k]))


def prefill_rows(a, fmt: str, shapes: list[Shape], pool, rng) -> None:
    print(f"## prefill, {fmt}, T = {a.tokens}")
    print("| shape | path | ms | GFLOP/s | torch bf16 ms | ours/torch bf16 | torch f32 ms | ours/torch f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for s in shapes:
        if s.name == "lm_head":
            continue
        op = Ours(s, fmt, rng, a.tokens)
        dt = timed([op], pool, 2, rounds=2)
        flop = 2.0 * a.tokens * s.groups * s.rows * s.cols * (3 if s.mlp else 1)
        cells = []
        for dtype in (torch.bfloat16, torch.float32):
            tt = None if a.no_torch else timed([Torch(s, dtype, a.tokens)], None, 2, rounds=2)
            cells += [f"{tt * 1e3:.1f}", f"{dt / tt:.2f}"] if tt else ["-", "-"]
        print(f"| {s.name} | {op.path} | {dt * 1e3:.1f} | {flop / dt / 1e9:.0f} | " + " | ".join(cells) + " |")


def fixed_cost(a, pool, rng) -> None:
    """Per-call microseconds at the tiny model's shapes (weights in cache): Python, dispatch, hand-off."""
    layer = ("q_a", "q_b", "kv_a", "kv_b W_UK^T", "kv_b W_UV", "o_proj", "shared MLP")
    print("## fixed cost per call, tiny model shapes (T = 1, weights in cache)")
    print("| shape | " + " | ".join(f"{f} us" for f in a.formats.split(",")) + " | torch f32 us |")
    print("|---|" + "---|" * (len(a.formats.split(",")) + 1))
    sums = {f: 0.0 for f in a.formats.split(",") + ["torch"]}
    for s in MODELS["tiny"]:
        cells = []
        for fmt in a.formats.split(","):
            us = timed([Ours(s, fmt, rng, 1)], pool, 2000) * 1e6
            cells.append(f"{us:.1f}")
            sums[fmt] += us if s.name in layer else 0.0
        tus = timed([Torch(s, torch.float32, 1)], None, 2000) * 1e6
        sums["torch"] += tus if s.name in layer else 0.0
        print(f"| {s.name} | " + " | ".join(cells) + f" | {tus:.1f} |")
    print(f"one MoE layer's dense products ({', '.join(layer)}): " +
          ", ".join(f"{k} {v:.0f} us" for k, v in sums.items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: physical cores)")
    p.add_argument("--formats", default="int4,fp8,bf16")
    p.add_argument("--models", default="bench,k2",
                   help="shape sets: bench, k2, or '' for the fixed cost alone (tiny's shapes, always run)")
    p.add_argument("--tokens", type=int, default=128, help="prefill tokens")
    p.add_argument("--pool-gib", type=float, default=1.0, help="bytes of copies per shape, so reads are cold")
    p.add_argument("--torch-max-gib", type=float, default=3.0, help="skip a torch baseline needing more memory")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-prefill", action="store_true")
    a = p.parse_args(argv)
    a.threads = a.threads or physical_cores()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    pool = RowPool(a.threads)
    print(f"# threads={a.threads} (ours and torch), load average at start {os.getloadavg()[0]:.2f}: the host is "
          f"shared, figures are best of rounds; compare within this run")
    buf = np.ones(GIB, np.uint8)
    fixed_cost(a, pool, rng)
    for model in filter(None, a.models.split(",")):
        print(f"# {model} shapes")
        for fmt in a.formats.split(","):
            decode_rows(a, fmt, MODELS[model], pool, buf, rng)
            if not a.no_prefill:
                prefill_rows(a, fmt, MODELS[model], pool, rng)
    pool.close()
    print(f"# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
