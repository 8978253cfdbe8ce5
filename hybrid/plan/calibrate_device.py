"""Calibration of the device side (torch on CUDA, or the CPU standing in for it): what `hybrid plan --calibrate`
measures besides the CPU kernels (hybrid/plan/calibrate.py).

- measure_device: matrix-vector bandwidth over K2-shaped weights in the compute dtype, matmul FLOP/s at 512
  tokens, host-to-device copy rate;
- measure_modules: seconds per decode token of an attention layer, a shared expert and a dense MLP of a
  model's shape (the device rates the plan uses for that model);
- measure_join: how the device's work and the CPU experts overlap (submit, device work, wait).
Weights are random and every page is written before it is timed (untouched memory reads as free zeros).
"""
from __future__ import annotations

import time

import numpy as np

GIB = 1 << 30


def measure_device(device: str, dtype: str, total_gib: float | None = None, log=print) -> dict:
    """torch on the device: matvec bandwidth (K2-shaped weights, > 1 GiB in all), matmul FLOP/s, copy rate."""
    import torch
    dev, dt, sync = _torch_device(device, dtype)
    esize = torch.tensor([], dtype=dt).element_size()
    total = (total_gib or (6 if dev.type == "cuda" else 1.5)) * GIB
    with torch.inference_mode():
        matvec, nbytes, last = _matvec_rate(dev, dt, sync, total)
        flops = _matmul_rate(last, sync)
        copy_rate = _copy_rate(dev, dt, sync)
        memcpy, h2d = staging_rates(dev, sync)
    del last
    log(f"  device {dev} ({str(dt).replace('torch.', '')}): matvec {matvec / 1e9:.1f} GB/s over "
        f"{nbytes / GIB:.1f} GiB, matmul {flops / 1e9:.0f} GFLOP/s, float copy to the device {copy_rate / 1e9:.1f} "
        f"GB/s, staging memcpy {memcpy / 1e9:.1f} GB/s"
        + (f", pinned host->device {h2d / 1e9:.1f} GB/s" if h2d else ""))
    memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    return {"device": str(dev), "dtype": str(dt).replace("torch.", ""), "dtype_bytes": esize, "memory_bytes": memory,
            "matvec_gbs": matvec / 1e9, "matmul_gflops": flops / 1e9,
            "copy_gbs": copy_rate / 1e9,
            "memcpy_gbs": memcpy / 1e9, "h2d_gbs": h2d / 1e9 if h2d else None}


# (out, in) weights of K2's widths, as a decode step reads them: expert gate/up 2048x7168, down 7168x2048,
# q_a_proj 1536x7168, kv_a_proj 576x7168, ...
_MATVEC_SHAPES = [(2048, 7168), (7168, 2048), (1536, 7168), (576, 7168), (7168, 1024), (4096, 7168)]


def _matvec_rate(dev, dt, sync, total: float) -> tuple:
    """(B/s of one-token F.linear over about `total` bytes of weights in _MATVEC_SHAPES, the bytes read,
    the last weight, which _matmul_rate reuses)."""
    import torch
    import torch.nn.functional as F
    esize = torch.tensor([], dtype=dt).element_size()
    per_round = sum(r * c for r, c in _MATVEC_SHAPES) * esize
    mats = [torch.randn(r, c, device=dev, dtype=torch.float32).to(dt) * 0.01
            for _ in range(max(1, int(total // per_round))) for r, c in _MATVEC_SHAPES]
    nbytes = sum(m.numel() * esize for m in mats)
    x = {c: torch.randn(1, c, device=dev, dtype=dt) for _, c in _MATVEC_SHAPES}

    def all_mats():
        for m in mats:
            F.linear(x[m.shape[1]], m)
    return nbytes / _best_seconds(all_mats, sync), nbytes, mats[-1]


def _matmul_rate(w, sync) -> float:
    """FLOP/s of a 512-token F.linear with weight `w` (after one warm-up call)."""
    import torch
    import torch.nn.functional as F
    xb = torch.randn(512, w.shape[1], device=w.device, dtype=w.dtype)
    F.linear(xb, w)
    return 2 * 512 * w.numel() / _best_seconds(lambda: F.linear(xb, w), sync)


def _copy_rate(dev, dt, sync) -> float:
    """B/s (in the compute dtype) of copying a float32 host array of one K2 expert matrix to the device."""
    import torch
    host = np.ones((2048, 7168), np.float32)
    esize = torch.tensor([], dtype=dt).element_size()
    return host.size * esize / _best_seconds(lambda: torch.from_numpy(host).to(dev, dt, copy=True), sync)


def _torch_device(device: str, dtype: str) -> tuple:
    """(torch.device, torch.dtype, a function that waits for the device's queued work)."""
    import torch

    from hybrid.runtime.device import resolve_device, resolve_dtype
    dev = resolve_device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    return dev, resolve_dtype(dtype, dev), sync


def _best_seconds(fn, sync, rounds: int = 3) -> float:
    """Shortest of `rounds` timings of fn(), each from an idle device to the end of its work."""
    best = float("inf")
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _random_modules(make, dev, dt, min_bytes: int = 0) -> list:
    """Instances of make() on `dev` in `dt` with N(0, 0.02) weights, at least two and at least `min_bytes` of
    weights in all. Built on the meta device first; writing every weight touches every page (untouched memory
    reads as free zeros)."""
    import torch
    out, total = [], 0
    while total < min_bytes or len(out) < 2:
        with torch.device("meta"):
            mod = make()
        mod = mod.to_empty(device=dev).to(dt)
        for prm in mod.parameters():
            prm.requires_grad_(False).normal_(0, 0.02)
        out.append(mod)
        total += sum(p.numel() * p.element_size() for p in mod.parameters())
    return out


def staging_rates(dev, sync, nbytes: int = 128 << 20) -> tuple[float, float | None]:
    """(B/s of copying packed bytes into a staging buffer on the host, pinned when CUDA is present;
    B/s of a pinned host-to-device copy, None without CUDA): the two halves of a hot-set load."""
    import torch
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    cuda = dev.type == "cuda"
    stage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = stage.numpy()
    best = _best_seconds(lambda: np.copyto(dst, src), lambda: None)
    h2d = None
    if cuda:
        out = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        h2d = nbytes / _best_seconds(lambda: out.copy_(stage, non_blocking=True), sync)
    return nbytes / best, h2d


def modules_key(cfg, dtype_name: str) -> str:
    """What a module timing depends on: the layer's dimensions and the compute dtype."""
    return (f"H{cfg.hidden_size}-nh{cfg.num_attention_heads}-q{cfg.q_lora_rank}-kv{cfg.kv_lora_rank}-"
            f"d{cfg.qk_nope_head_dim}.{cfg.qk_rope_head_dim}.{cfg.v_head_dim}-I{cfg.moe_intermediate_size}x"
            f"{cfg.n_shared_experts}-D{cfg.intermediate_size}-{dtype_name}")


def measure_modules(cfg, device: str, dtype: str, cache_tokens: int = 256, log=print) -> dict:
    """Seconds per decode token of one attention layer (absorbed MLA over `cache_tokens` cached tokens, with
    its norm), one shared-expert MLP and one dense MLP, at `cfg`'s dimensions with random weights on the device,
    and the bytes per second each reads. Instances are cycled so that the weights come from memory, not from a
    cache."""
    import torch
    dev, dt, sync = _torch_device(device, dtype)
    dname = str(dt).replace("torch.", "")
    res = {"key": modules_key(cfg, dname), "cache_tokens": cache_tokens}
    with torch.inference_mode():
        res.update(_module_seconds(cfg, dev, dt, sync, cache_tokens))
    res.update(_module_rates(cfg, torch.tensor([], dtype=dt).element_size(), res))
    log(f"  modules {res['key']}: attention {1e3 * res['attn_s']:.2f} ms ({res['attn_gbs']:.1f} GB/s), shared expert "
        f"{1e3 * res['shared_s']:.2f} ms ({res['shared_gbs']:.1f} GB/s)"
        + (f", dense MLP {1e3 * res['dense_s']:.2f} ms ({res['dense_gbs']:.1f} GB/s)" if "dense_s" in res else ""))
    return res


def _module_seconds(cfg, dev, dt, sync, cache_tokens: int) -> dict:
    """{"attn_s", "shared_s", and "dense_s" when cfg has dense layers}: seconds per one-token call, the best
    of three rounds over instances holding at least 256 MiB (CPU) or 1 GiB (CUDA) of weights."""
    import torch

    from gpu_attn import MLA, MLP, RMSNorm
    floor = (256 << 20) if dev.type == "cpu" else (1 << 30)
    x = torch.randn(1, cfg.hidden_size, device=dev, dtype=dt)
    cache = torch.randn(cache_tokens + 1, cfg.kv_cache_dim, device=dev, dtype=dt) * 0.1
    rope, scale = _rope(cfg, dev, cache_tokens)

    def per_call(make, fn) -> float:
        mods = _random_modules(make, dev, dt, floor)
        return _best_seconds(lambda: [fn(m) for m in mods], sync) / len(mods)
    out = {"attn_s": per_call(lambda: torch.nn.ModuleList([RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), MLA(
        cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim, cfg.v_head_dim, scale, rope)]), lambda m: m[1](m[0](x), cache_tokens, cache, True)),
        "shared_s": per_call(lambda: MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts),
                             lambda m: m(x))}
    if cfg.first_k_dense_replace > 0:
        out["dense_s"] = per_call(lambda: MLP(cfg.hidden_size, cfg.intermediate_size), lambda m: m(x))
    return out


def _rope(cfg, dev, cache_tokens: int) -> tuple:
    """(YarnRope for `cache_tokens` positions and a few more, MLA's softmax scale) of `cfg`."""
    from gpu_attn import YarnRope
    from gpu_attn.rope import softmax_scale
    r = cfg.rope
    rope = YarnRope(cfg.qk_rope_head_dim, r.theta, r.type, r.factor, r.original_max_position_embeddings,
                    r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim, max_positions=cache_tokens + 8, device=dev)
    return rope, softmax_scale(cfg.qk_head_dim, r.type, r.factor, r.mscale_all_dim)


def _module_rates(cfg, esize: int, res: dict) -> dict:
    """{"attn_gbs", "shared_gbs"[, "dense_gbs"]}: the bytes each timed module reads per token over its seconds
    (attention: its weights without the post-attention norm, plus the cache it attends over)."""
    from hybrid.plan.perf import ModelCost
    c = ModelCost.of(cfg, esize, "bf16")
    moe_l = next((i for i, (moe, *_) in enumerate(c.layers) if moe), 0)
    attn_b = c.layers[moe_l][1] - cfg.hidden_size * esize            # the post-attention norm is not in the module
    shared_b = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.n_shared_experts * esize
    out = {"attn_gbs": (attn_b + (res["cache_tokens"] + 1) * cfg.kv_cache_dim * esize) / res["attn_s"] / 1e9,
           "shared_gbs": shared_b / res["shared_s"] / 1e9}
    if "dense_s" in res:
        out["dense_gbs"] = 3 * cfg.hidden_size * cfg.intermediate_size * esize / res["dense_s"] / 1e9
    return out


def measure_join(device: str, dtype: str, threads: int, shape=None, rounds: int = 3, log=print) -> dict:
    """How the device's work and the CPU experts overlap: one shared-expert MLP on the device and one
    one-token CPU MoE call (8 random FP8 experts), alone and together (submit, device work, wait); `shape`
    (hidden, expert width) defaults to K2's.
    serial = (together - max) / min: 0 when they overlap perfectly, 1 when they take turns."""
    import torch
    dev, dt, sync = _torch_device(device, dtype)
    moe, calls, work = _join_work(dev, dt, sync, threads, shape)
    times = {}
    with torch.inference_mode():
        for name, fn in work.items():
            fn()
            b = float("inf")
            for _ in range(rounds):
                t = time.perf_counter()
                for _ in range(4):
                    fn()
                b = min(b, (time.perf_counter() - t) / 4 / calls)
            times[name] = b
    moe.close()
    lo, hi = sorted((times["device_s"], times["cpu_s"]))
    times["serial"] = float(min(1.0, max(0.0, (times["together_s"] - hi) / lo)))
    log(f"  overlap: device {1e3 * times['device_s']:.1f} ms, CPU experts {1e3 * times['cpu_s']:.1f} ms, together "
        f"{1e3 * times['together_s']:.1f} ms -> serial fraction {times['serial']:.2f}")
    return times


def _join_work(dev, dt, sync, threads: int, shape) -> tuple:
    """(the CpuMoE to close, calls per function, {"device_s": the device's MLPs alone, "cpu_s": the CPU MoE
    alone, "together_s": both the way a MoE layer runs them: submit, device work, wait})."""
    import torch

    from cpu_experts import CpuMoE
    from cpu_experts.measure import TOPK, random_store
    from cpu_experts.measure import H as K2_H
    from cpu_experts.measure import I as K2_I
    from gpu_attn import MLP
    hidden, inter = shape or (K2_H, K2_I)
    rng = np.random.default_rng(1)
    moe = CpuMoE({0: random_store("fp8", 32, rng, hidden, inter)}, threads=threads)
    mlps = _random_modules(lambda: MLP(hidden, inter), dev, dt)
    x = torch.randn(1, hidden, device=dev, dtype=dt)
    h = rng.standard_normal((1, hidden), dtype=np.float32)
    w = np.full((1, TOPK), 1.0 / TOPK, np.float32)

    def ids():
        return rng.choice(32, TOPK, replace=False)[None]

    def dev_only():
        for m in mlps:
            m(x)
        sync()

    def cpu_only():
        for _ in mlps:
            moe(0, h, ids(), w)

    def both():
        for m in mlps:
            t = moe.submit(0, h, ids(), w)
            m(x)
            sync()
            moe.wait(t)
    return moe, len(mlps), {"device_s": dev_only, "cpu_s": cpu_only, "together_s": both}
