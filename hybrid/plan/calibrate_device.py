"""Calibration of the device side (torch on CUDA, or the CPU standing in for it): what `hybrid plan --calibrate`
measures besides the CPU kernels (hybrid/calibrate.py).

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
    import torch.nn.functional as F

    from hybrid.runtime.device import resolve_device, resolve_dtype
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    esize = torch.tensor([], dtype=dt).element_size()
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    shapes = [(2048, 7168), (7168, 2048), (1536, 7168), (576, 7168), (7168, 1024), (4096, 7168)]
    total = (total_gib or (6 if dev.type == "cuda" else 1.5)) * GIB
    per_round = sum(r * c for r, c in shapes) * esize
    mats = [torch.randn(r, c, device=dev, dtype=torch.float32).to(dt) * 0.01
            for _ in range(max(1, int(total // per_round))) for r, c in shapes]
    nbytes = sum(m.numel() * esize for m in mats)
    x = {c: torch.randn(1, c, device=dev, dtype=dt) for _, c in shapes}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            sync()
            t = time.perf_counter()
            for m in mats:
                F.linear(x[m.shape[1]], m)
            sync()
            best = min(best, time.perf_counter() - t)
        matvec = nbytes / best
        w = mats[-1]
        xb = torch.randn(512, w.shape[1], device=dev, dtype=dt)
        F.linear(xb, w)
        fl = float("inf")
        for _ in range(3):
            sync()
            t = time.perf_counter()
            F.linear(xb, w)
            sync()
            fl = min(fl, time.perf_counter() - t)
        flops = 2 * 512 * w.numel() / fl
        host = np.ones((2048, 7168), np.float32)
        cp = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            y = torch.from_numpy(host).to(dev, dt, copy=True)
            sync()
            cp = min(cp, time.perf_counter() - t)
        copy_rate = y.numel() * esize / cp
        memcpy, h2d = staging_rates(dev, sync)
    del mats
    log(f"  device {dev} ({str(dt).replace('torch.', '')}): matvec {matvec / 1e9:.1f} GB/s over "
        f"{nbytes / GIB:.1f} GiB, matmul {flops / 1e9:.0f} GFLOP/s, float copy to the device {copy_rate / 1e9:.1f} "
        f"GB/s, staging memcpy {memcpy / 1e9:.1f} GB/s"
        + (f", pinned host->device {h2d / 1e9:.1f} GB/s" if h2d else ""))
    memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    return {"device": str(dev), "dtype": str(dt).replace("torch.", ""), "dtype_bytes": esize, "memory_bytes": memory,
            "matvec_gbs": matvec / 1e9, "matmul_gflops": flops / 1e9,
            "copy_gbs": copy_rate / 1e9,
            "memcpy_gbs": memcpy / 1e9, "h2d_gbs": h2d / 1e9 if h2d else None}


def staging_rates(dev, sync, nbytes: int = 128 << 20) -> tuple[float, float | None]:
    """(B/s of copying packed bytes into a staging buffer on the host, pinned when CUDA is present;
    B/s of a pinned host-to-device copy, None without CUDA): the two halves of a hot-set load."""
    import torch
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    cuda = dev.type == "cuda"
    stage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = stage.numpy()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    h2d = None
    if cuda:
        out = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        b2 = float("inf")
        for _ in range(3):
            sync()
            t = time.perf_counter()
            out.copy_(stage, non_blocking=True)
            sync()
            b2 = min(b2, time.perf_counter() - t)
        h2d = nbytes / b2
    return nbytes / best, h2d


def modules_key(cfg, dtype_name: str) -> str:
    """What a module timing depends on: the layer's dimensions and the compute dtype."""
    return (f"H{cfg.hidden_size}-nh{cfg.num_attention_heads}-q{cfg.q_lora_rank}-kv{cfg.kv_lora_rank}-"
            f"d{cfg.qk_nope_head_dim}.{cfg.qk_rope_head_dim}.{cfg.v_head_dim}-I{cfg.moe_intermediate_size}x"
            f"{cfg.n_shared_experts}-D{cfg.intermediate_size}-{dtype_name}")


def measure_modules(cfg, device: str, dtype: str, cache_tokens: int = 256, log=print) -> dict:
    """Seconds per decode token of one attention layer (absorbed MLA over `cache_tokens` cached tokens, with
    its norm), one shared-expert MLP and one dense MLP, at `cfg`'s dimensions with random weights on the device.
    Instances are cycled so that the weights come from memory, not from a cache."""
    import torch

    from gpu_attn import MLA, MLP, RMSNorm, YarnRope
    from gpu_attn.rope import softmax_scale

    from hybrid.runtime.device import resolve_device, resolve_dtype
    from hybrid.plan.perf import ModelCost
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    dname = str(dt).replace("torch.", "")
    esize = torch.tensor([], dtype=dt).element_size()
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    r = cfg.rope
    rope = YarnRope(cfg.qk_rope_head_dim, r.theta, r.type, r.factor, r.original_max_position_embeddings,
                    r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim, max_positions=cache_tokens + 8, device=dev)
    scale = softmax_scale(cfg.qk_head_dim, r.type, r.factor, r.mscale_all_dim)

    def build(make, min_bytes):
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

    def best(fn, mods, rounds=3):
        t_best = float("inf")
        for _ in range(rounds):
            sync()
            t = time.perf_counter()
            for m in mods:
                fn(m)
            sync()
            t_best = min(t_best, (time.perf_counter() - t) / len(mods))
        return t_best

    floor = (256 << 20) if dev.type == "cpu" else (1 << 30)
    x = torch.randn(1, cfg.hidden_size, device=dev, dtype=dt)
    cache = torch.randn(cache_tokens + 1, cfg.kv_cache_dim, device=dev, dtype=dt) * 0.1
    res = {"key": modules_key(cfg, dname), "cache_tokens": cache_tokens}
    with torch.inference_mode():
        attn = build(lambda: torch.nn.ModuleList([RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), MLA(
            cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim, cfg.v_head_dim, scale, rope)]), floor)
        res["attn_s"] = best(lambda m: m[1](m[0](x), cache_tokens, cache, True), attn)
        del attn
        shared = build(lambda: MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts), floor)
        res["shared_s"] = best(lambda m: m(x), shared)
        del shared
        if cfg.first_k_dense_replace > 0:
            dense = build(lambda: MLP(cfg.hidden_size, cfg.intermediate_size), floor)
            res["dense_s"] = best(lambda m: m(x), dense)
            del dense
    c = ModelCost.of(cfg, esize, "bf16")
    moe_l = next((i for i, (moe, *_) in enumerate(c.layers) if moe), 0)
    attn_b = c.layers[moe_l][1] - cfg.hidden_size * esize            # the post-attention norm is not in the module
    shared_b = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.n_shared_experts * esize
    res["attn_gbs"] = (attn_b + (cache_tokens + 1) * cfg.kv_cache_dim * esize) / res["attn_s"] / 1e9
    res["shared_gbs"] = shared_b / res["shared_s"] / 1e9
    if "dense_s" in res:
        res["dense_gbs"] = 3 * cfg.hidden_size * cfg.intermediate_size * esize / res["dense_s"] / 1e9
    log(f"  modules {res['key']}: attention {1e3 * res['attn_s']:.2f} ms ({res['attn_gbs']:.1f} GB/s), shared expert "
        f"{1e3 * res['shared_s']:.2f} ms ({res['shared_gbs']:.1f} GB/s)"
        + (f", dense MLP {1e3 * res['dense_s']:.2f} ms ({res['dense_gbs']:.1f} GB/s)" if "dense_s" in res else ""))
    return res


def measure_join(device: str, dtype: str, threads: int, shape=None, rounds: int = 3, log=print) -> dict:
    """How the device's work and the CPU experts overlap: one shared-expert MLP on the device and one
    one-token CPU MoE call (8 random FP8 experts), alone and together (submit, device work, wait); `shape`
    (hidden, expert width) defaults to K2's.
    serial = (together - max) / min: 0 when they overlap perfectly, 1 when they take turns."""
    import torch

    from cpu_experts import CpuMoE
    from cpu_experts.measure import TOPK, random_store
    from cpu_experts.measure import H as K2_H
    from cpu_experts.measure import I as K2_I
    from gpu_attn import MLP

    from hybrid.runtime.device import resolve_device, resolve_dtype
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    hidden, inter = shape or (K2_H, K2_I)
    rng = np.random.default_rng(1)
    store = random_store("fp8", 32, rng, hidden, inter)
    moe = CpuMoE({0: store}, threads=threads)
    mlps = []
    for _ in range(2):
        with torch.device("meta"):
            m = MLP(hidden, inter)
        m = m.to_empty(device=dev).to(dt).requires_grad_(False)
        for prm in m.parameters():
            prm.normal_(0, 0.02)                   # touch every page: untouched memory reads as free zeros
        mlps.append(m)
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

    times = {}
    with torch.inference_mode():
        for name, fn in (("device_s", dev_only), ("cpu_s", cpu_only), ("together_s", both)):
            fn()
            b = float("inf")
            for _ in range(rounds):
                t = time.perf_counter()
                for _ in range(4):
                    fn()
                b = min(b, (time.perf_counter() - t) / 4 / len(mlps))
            times[name] = b
    moe.close()
    lo, hi = sorted((times["device_s"], times["cpu_s"]))
    times["serial"] = float(min(1.0, max(0.0, (times["together_s"] - hi) / lo)))
    log(f"  overlap: device {1e3 * times['device_s']:.1f} ms, CPU experts {1e3 * times['cpu_s']:.1f} ms, together "
        f"{1e3 * times['together_s']:.1f} ms -> serial fraction {times['serial']:.2f}")
    return times
