"""`hybrid plan --calibrate`: measure this machine once, so plans scale from measured efficiency.

What is measured (each figure is best of a few rounds; the host may be shared):
- read_bandwidth: the Numba read loop with software prefetch over a pool far larger than the cache, all
  kernel threads (the ceiling the CPU kernels are held against, docs/kernels.md);
- per expert format: the CPU MoE's decode bandwidth on one-token calls with 8 random experts of K2's shape
  over the same-sized pool, and its fraction of the read loop ("kernel_efficiency"); prefill GFLOP/s per
  thread (256 tokens over 64 experts); decoding one stored expert into float32 weights on the CPU stand-in
  (hybrid/runtime/expert_copy.py's Numba decoder: what a bf16 hot-set load and each packed hot-set hit do);
- the device side (torch on `device`: CUDA, or the CPU standing in for it): matrix-vector bandwidth over
  K2-shaped weights in the compute dtype, matmul FLOP/s at 512 tokens, host-to-device copy rate;
- fixed costs, from the engine itself as `hybrid.load` runs it (dense auto: the dense linears packed, on a
  CPU device run by the kernels' pool in turn with the experts): decode of three tiny models of the same
  structure (2 dense layers; 1 dense + 1 MoE; 1 dense + 5 MoE) gives the cost of a dense layer and of a MoE
  layer beyond their weight reads (Python, dispatch, small ops, the router, the CPU-expert call) and the
  per-token rest (embedding, lm_head, sampler).
The device-side measurements live in hybrid/plan/calibrate_device.py. The result is a JSON file (default
~/.cache/hybrid/calibration.json, or $HYBRID_CALIBRATION) read by
`hybrid plan --machine local` and used to scale predictions for other hardware. It also records the load
average at the start and end: figures taken on a busy machine are not saved without --force (see calibrate).
"""
from __future__ import annotations

import errno
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from hybrid.plan.calibrate_device import measure_device, measure_join, measure_modules
from hybrid.plan.calibration import Calibration, CalibrationError
from quant.formats import FORMAT_NAMES

GIB = 1 << 30


def default_path() -> Path:
    env = os.environ.get("HYBRID_CALIBRATION")
    return Path(env) if env else Path.home() / ".cache" / "hybrid" / "calibration.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure_cpu(pool_gib: float, threads: int, formats=FORMAT_NAMES, calls: int = 24, log=print) -> dict:
    """Read bandwidth and, per format, the CPU kernels' decode bandwidth, prefill rate and copy cost."""
    from cpu_experts import CpuMoE
    from cpu_experts.measure import H, I, TOPK, decode_bw, prefill, random_store, read_bandwidth
    from quant.layout import make_layout
    rng = np.random.default_rng(0)
    out: dict = {"pool_gib": pool_gib, "threads": threads, "formats": {}}
    reads = []
    for fmt in formats:
        n = max(4 * TOPK, int(pool_gib * GIB // make_layout(fmt, H, I).stride))
        store = random_store(fmt, n, rng)
        moe = CpuMoE({0: store}, threads=threads)
        rb = max(v for k, v in read_bandwidth(store.buffer, threads, False).items() if "prefetch" in k)
        reads.append(rb)
        gbs, dt = decode_bw(moe, store, calls, rng)
        pre = prefill(moe, store, rng, T=256, rounds=1)
        deq = _decode_seconds(store)
        out["formats"][fmt] = {
            "decode_gbs": gbs, "decode_ms_per_call": dt * 1e3, "kernel_efficiency": gbs / rb,
            "prefill_gflops": pre["prefill GFLOP/s"], "prefill_gflops_per_thread": pre["prefill GFLOP/s"] / threads,
            "dequantize_params_per_s": 3 * H * I / deq, "path": moe.paths()[0]}
        log(f"  {fmt}: decode {gbs:.1f} GB/s = {100 * gbs / rb:.0f} % of the read loop ({rb:.1f} GB/s), "
            f"prefill {pre['prefill GFLOP/s']:.0f} GFLOP/s, dequantize {3 * H * I / deq / 1e9:.2f} Gparam/s")
        moe.close()
        del moe, store
    out["read_gbs"] = float(np.mean(reads))
    return out


def measure_overheads(device: str, dtype: str, threads: int, fmt: str = "fp8", tokens: int = 32, dense: str = "auto",
                      log=print) -> dict:
    """Fixed costs of the engine per decode token, from three tiny models of the same structure: two dense
    layers; one dense + one MoE; one dense + five MoE. Their weights are small, so what remains is Python,
    dispatch, small ops and the CPU-expert call: token = A - 2d, dense layer d = A - B + m, MoE layer
    m = (C - B) / 4. The engine runs as `hybrid.load` would: `dense` is its dense choice (auto: the tiny
    models' FP8, packed; on a CPU device the kernels' pool runs them, synchronously)."""
    from hybrid.runtime.loader import load
    from hybrid.models.tiny import make_tiny
    shapes = {"A": (2, 2), "B": (2, 1), "C": (6, 1)}            # (layers, first_k_dense_replace)
    t = {}
    with tempfile.TemporaryDirectory(prefix="hybrid-calibrate-") as tmp:
        for key, (n, k) in shapes.items():
            d = make_tiny(Path(tmp) / key, preset="tiny", tokenizer=False,
                          overrides={"num_hidden_layers": n, "first_k_dense_replace": k, "n_routed_experts": 64,
                                     "num_experts_per_tok": 8})
            eng = load(d, device=device, dtype=dtype, experts=fmt, threads=threads, prefetch="off", dense=dense)
            eng.generate([1, 2, 3, 4], 4, stop_ids=())
            best = float("inf")
            for _ in range(5):
                eng.reset_stats()
                eng.generate([5, 6, 7, 8], tokens, stop_ids=())
                s = eng.stats()
                best = min(best, s.decode_seconds / max(1, s.decode_tokens - 1))
            t[key] = best
            del eng
    m = max(0.0, (t["C"] - t["B"]) / 4)
    d = max(0.0, t["A"] - t["B"] + m)
    tok = max(0.0, t["A"] - 2 * d)
    log(f"  fixed costs per decode token (--dense {dense}): {tok * 1e6:.0f} us + {d * 1e6:.0f} us per dense layer + "
        f"{m * 1e6:.0f} us per MoE layer")
    return {"token_s": tok, "dense_layer_s": d, "moe_layer_s": m, "raw_s": t, "dense": dense}


def calibrate(out: str | Path | None = None, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
              pool_gib: float = 2.0, formats=FORMAT_NAMES, device_gib: float | None = None, configs=None,
              join_shape=None, force: bool = False, log=print) -> Path:
    """Measure this machine and write the calibration JSON; returns its path. configs: ModelConfigs whose
    layers to time on the device (default: Kimi K2's).

    The load average is read before and after (see busy_reason) and stored in the file. Figures taken on a busy
    machine would mislead every later plan, so then nothing is saved and a CalibrationError names the load and
    the fix; with `force` they are saved, marked as taken under load (plans that use the file warn). A machine
    already busy at the start is refused before anything is measured. A thread or memory shortage while
    measuring is a CalibrationError too (see resource_shortage); nothing is saved."""
    from hybrid.runtime.device import resolve_threads
    threads = resolve_threads(threads)
    path = Path(out) if out else default_path()
    cores = os.cpu_count() or 1
    before = others_load(0.0)
    log(f"calibrating {cpu_name()} with {threads} threads (pool {pool_gib} GiB per format; about a minute); "
        f"load average at start {before:.2f} on {cores} cores")
    _check(busy_reason(before, cores, threads, "at the start"), force)
    t0 = time.time()
    data = {"version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_name(),
            "threads": threads}
    data.update(_measure(device, dtype, threads, pool_gib, formats, device_gib, configs, join_shape, force, log))
    data["ram_bytes"] = _ram_bytes()
    data["seconds"] = round(time.time() - t0, 1)
    after = others_load(own_load(threads, data["seconds"]))
    log(f"load average at end {after:.2f} from other processes (the calibration's own share taken out)")
    busy = "; ".join(r for r in (busy_reason(before, cores, threads, "at the start"),
                                 busy_reason(after, cores, threads, "at the end"),
                                 low_share_reason(data["cpu_side"])) if r)
    _check(busy, force)
    if busy:
        log(f"warning: saving figures taken under load ({busy}) because of --force; plans that use them will say so")
    data["load"] = {"before": round(before, 2), "after": round(after, 2), "cores": cores, "busy": busy}
    _save(path, data)
    log(f"wrote {path} ({data['seconds']} s)")
    return path


def _measure(device, dtype, threads, pool_gib, formats, device_gib, configs, join_shape, force, log) -> dict:
    """The measured sections of the calibration file, stage by stage (see calibrate); the CPU kernels' shares are
    judged as soon as they are known, so an implausible run stops before the rest is measured."""
    cpu_side = _stage("the CPU kernels", lambda: measure_cpu(pool_gib, threads, formats, log=log))
    _check(low_share_reason(cpu_side), force)
    fmt = "fp8" if "fp8" in formats else formats[0]
    data = {"cpu_side": cpu_side,
            "device_side": _stage("the device", lambda: measure_device(device, dtype, device_gib, log=log)),
            "overheads": _stage("the fixed costs", lambda: measure_overheads(device, dtype, threads, fmt, log=log)),
            "join": _stage("the overlap", lambda: measure_join(device, dtype, threads, join_shape, log=log))}
    if configs is None:
        from hybrid.plan.known_models import resolve_config
        configs = [resolve_config("kimi-k2")[0]]
    data["modules"] = {}
    for cfg in configs:
        r = _stage("the model's layers", lambda: measure_modules(cfg, device, dtype, log=log))
        data["modules"][r["key"]] = r
    return data


# Busy: other processes' load beyond the cores the calibration leaves free exceeds this share of the cores it
# uses (2 cores, 2 threads: a load of 0.5 from others). On a busy shared 2-core host a calibration gave INT4
# decode at 4 % of the read loop and a 5.3 ms fixed cost per MoE layer (issue 28), against 85 % and
# 0.5-0.65 ms idle (BENCHMARKS.md).
BUSY_SHARE = 0.25
# The vector kernels read at 70-90 % of the read loop on an idle machine (avx512 and avx2); below this share
# the run measured contention, not the kernels. The plain path legitimately reads at 4-24 %: not judged.
MIN_KERNEL_SHARE = 0.2


def others_load(own: float) -> float:
    """The 1-minute load average less `own`, the calibration's estimated share of it (not below 0)."""
    return max(0.0, os.getloadavg()[0] - own)


def own_load(threads: int, seconds: float) -> float:
    """The calibration's share of the 1-minute load average after `seconds` of `threads` busy threads (the kernel
    averages with a 60 s time constant)."""
    return threads * (1 - math.exp(-seconds / 60))


def busy_reason(load: float, cores: int, threads: int, when: str) -> str:
    """Why figures taken while other processes put `load` on the machine are unreliable ("" when they are not):
    busy when that load exceeds the cores the calibration leaves free by more than BUSY_SHARE of its threads."""
    limit = max(0, cores - threads) + BUSY_SHARE * threads
    if load <= limit:
        return ""
    return (f"load average {load:.2f} from other processes {when}, on {cores} cores with {threads} calibration "
            f"threads (at most {limit:.2f} is idle enough)")


def low_share_reason(cpu_side: dict) -> str:
    """Why the CPU kernels' measured shares of the read loop are implausible ("" when they are not)."""
    low = [f"{fmt} {100 * f['kernel_efficiency']:.0f} %" for fmt, f in cpu_side["formats"].items()
           if f["path"] != "plain" and f["kernel_efficiency"] < MIN_KERNEL_SHARE]
    if not low:
        return ""
    return (f"the CPU kernels read at {', '.join(low)} of the read loop (an idle machine: 70-90 %; "
            f"below {100 * MIN_KERNEL_SHARE:.0f} % is contention)")


def _check(busy: str, force: bool) -> None:
    """Refuse figures taken under load (busy: why; "" when idle) unless `force`."""
    if busy and not force:
        raise CalibrationError(f"the machine is busy ({busy}); figures measured now would mislead every later plan, "
                               f"so nothing was saved: rerun `hybrid plan --calibrate` when the machine is idle, or "
                               f"add --force to save them anyway (marked as taken under load)")


def _stage(what: str, measure):
    """measure(); a thread or memory shortage on the way becomes a CalibrationError naming `what` was being
    measured, what ran out and the fix. Other errors pass unchanged."""
    try:
        return measure()
    except (RuntimeError, MemoryError, OSError) as e:
        shortage = resource_shortage(e)
        if shortage is None:
            raise
        raise CalibrationError(f"calibration stopped while measuring {what}: {shortage}; nothing was saved") from None


def resource_shortage(e: BaseException) -> str | None:
    """What ran out and the fix, when `e` is the machine refusing a thread or memory; None for other errors."""
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
        return ("out of memory; rerun when memory is free (other processes hold it) or with a smaller --pool-gib, "
                "or add swap")
    thread = isinstance(e, RuntimeError) and any(s in str(e) for s in ("can't start new thread", "pthread_create",
                                                                     "Resource temporarily unavailable"))
    if thread or (isinstance(e, OSError) and e.errno == errno.EAGAIN):
        return (f"the system refused a new thread ({e}): its limit on threads and processes is reached (other "
                f"processes, or `ulimit -u`); rerun when the machine is less busy, or with fewer --threads")
    return None


def _ram_bytes() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _save(path: Path, data: dict) -> None:
    """Write `data` as JSON to `path` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def load_calibration(path: str | Path | None = None) -> Calibration:
    """The stored calibration as a typed record; a clear error when there is none or it is not one."""
    p = Path(path) if path else default_path()
    if not p.is_file():
        raise FileNotFoundError(f"no calibration at {p}; run `hybrid plan --calibrate` on this machine first "
                                f"(about a minute), or pass --calibration FILE")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{p} is not a calibration file ({e}); run `hybrid plan --calibrate` again") from None
    return Calibration.parse(data, str(p))


def _decode_seconds(store, rounds: int = 5) -> float:
    """Seconds to decode one packed expert of `store` into the stand-in's float32 buffer (best of `rounds`)."""
    import torch
    from hybrid.runtime.expert_copy import DecodeBuffer, ExpertCopier
    cpu = torch.device("cpu")
    buf = DecodeBuffer(store.spec, cpu, torch.float32)
    packed = [ExpertCopier(cpu).packed(store, e) for e in range(rounds)]
    best = float("inf")
    for p in packed:
        t = time.perf_counter()
        buf.weights(p)
        best = min(best, time.perf_counter() - t)
    return best
