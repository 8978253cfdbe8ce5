"""`make gpu-check`: what needs a GPU, in one run of under 8 minutes on one GPU. Run it whenever a GPU is at hand.

    PYTHONPATH=. python3 -m bench.gpu_check [--model BENCH_DIR] [--threads N] [--tokens 32] [--budget 25%]

1. The CUDA tests: `pytest -m "" -k cuda` over CUDA_TEST_FILES (tests that skip without CUDA).
2. The bench model (`hybrid make-tiny --preset bench`, K2's expert shape, 5.9 GB; made on first use in
   $TMPDIR/hybrid-gpu-check-bench while the tests run, or --model): prefill and decode with the dense part on
   the GPU (dense auto: the checkpoint's FP8, kept packed and dequantized per use) and the routed experts on
   the CPU kernels; then the same with a hot set (--budget, the router policy: its copies run on a side stream),
   with its hits and copies.
3. Logits agreement with the CPU path: max |delta| of a forward of the same ids, device=cuda against
   device=cpu, both float32 (must be within AGREE_REL of max |logit|) and the default bfloat16 (reported).
Without CUDA it prints "no CUDA device: skipped" and exits 0. It needs nothing beyond CUDA torch, numba,
llvmlite, safetensors, tiktoken, regex, psutil, pytest and transformers, and runs from the checkout
(PYTHONPATH=.) without an install. Exit status: 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Test files with CUDA tests (each skips without CUDA); tests/cli/test_gpu_check.py checks that every test file
# asking for CUDA is listed. Only these are collected: other test files import packages the GPU machine lacks.
CUDA_TEST_FILES = ("tests/runtime/test_cuda.py", "tests/runtime/test_devices.py", "tests/runtime/test_expert_copy.py", "tests/runtime/test_hotset.py")
AGREE_REL = 1e-3            # float32 CUDA vs float32 CPU: max |delta| / max |logit| (summation order only)
BUDGET_S = 8 * 60           # the whole check, on one GPU
PROMPT_TOKENS = 512


@dataclass(frozen=True)
class RunResult:
    """One engine's prefill and decode on the bench model, with its hot set's counters (none: zeros)."""
    label: str
    load_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    hot_set_hit_rate: float
    hot_set_loads: int
    copy_seconds: float

    def describe(self) -> str:
        hot = (f"; hot set: {100 * self.hot_set_hit_rate:.1f} % of activations, {self.hot_set_loads} copies "
               f"({self.copy_seconds:.2f} s)" if self.hot_set_loads or self.hot_set_hit_rate else "")
        return (f"{self.label}: load {self.load_s:.1f} s, prefill {self.prefill_tokens_per_s:.1f} tok/s, "
                f"decode {self.decode_tokens_per_s:.2f} tok/s{hot}")


@dataclass(frozen=True)
class Agreement:
    """Logits of one forward of the same ids on two engines."""
    label: str
    max_abs: float
    max_logit: float
    argmax_agree: float

    @property
    def rel(self) -> float:
        return self.max_abs / max(self.max_logit, 1e-30)

    def describe(self) -> str:
        return (f"{self.label}: max |delta logit| {self.max_abs:.3g} ({self.rel:.2e} of max |logit| "
                f"{self.max_logit:.3g}), argmax agreement {100 * self.argmax_agree:.0f} %")


def pytest_command(python: str = sys.executable) -> list[str]:
    return [python, "-m", "pytest", "-q", "-m", "", "-k", "cuda", *CUDA_TEST_FILES]


def run_cuda_tests(timeout_s: float) -> int:
    """The CUDA tests in a child process (so a crash in one cannot take this check down); its exit status."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        return subprocess.run(pytest_command(), cwd=ROOT, env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"the CUDA tests ran past {timeout_s:.0f} s and were stopped", flush=True)
        return 1


def start_bench_model(path: Path, preset: str = "bench") -> subprocess.Popen | None:
    """Start making the bench model (or another make-tiny preset) at `path` in a child process, unless it is
    there; None when it is."""
    if (path / "config.json").is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    code = f"from hybrid.models.tiny import make_tiny; make_tiny({str(path)!r}, preset={preset!r}, tokenizer=False)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


def run_engine(model: Path, label: str, prompt_tokens: int, decode_tokens: int, **load_kw) -> RunResult:
    """hybrid.load(model, **load_kw), a warm-up, then a prefill of `prompt_tokens` random ids and a greedy
    decode of `decode_tokens`."""
    import numpy as np

    import hybrid
    t0 = time.perf_counter()
    eng = hybrid.load(model, **load_kw)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    V = eng.cfg.vocab_size
    eng.generate(rng.integers(0, V, 16).tolist(), 4, stop_ids=())             # compile caches, touch pages
    eng.reset_stats()
    eng.generate(rng.integers(0, V, prompt_tokens).tolist(), decode_tokens, stop_ids=())
    s, hot = eng.stats(), eng.experts.stats().hot_set
    _close(eng)
    return RunResult(label, load_s, s.prefill_tokens_per_s, s.decode_tokens_per_s,
                     hot.hit_rate if hot else 0.0, hot.loads if hot else 0, hot.copy_seconds if hot else 0.0)


def logits(model: Path, ids: list[int], **load_kw):
    """float32 logits [len(ids), vocab] of a fresh forward, on the CPU."""
    import hybrid
    eng = hybrid.load(model, prefetch="off", **load_kw)
    out = eng.forward(ids).float().cpu()
    _close(eng)
    return out


def _close(eng) -> None:
    """Free an engine's memory before the next one loads (device memory too)."""
    import gc

    import torch
    del eng
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def agreement(label: str, a, b) -> Agreement:
    """How two logit tensors [T, V] agree (b is the reference)."""
    return Agreement(label, float((a - b).abs().max()), float(b.abs().max()),
                     float((a.argmax(-1) == b.argmax(-1)).float().mean()))


def check_model(model: Path, device: str, threads: int | None, tokens: int, budget: str,
                prompt_tokens: int = PROMPT_TOKENS) -> tuple[list[RunResult], list[Agreement]]:
    """Steps 2 and 3 of the module docstring on `device` (cuda; the tests run it on cpu)."""
    common = {"threads": threads, "experts": "auto", "dense": "auto"}
    runs = [run_engine(model, f"{device}, dense auto on the device, experts on the CPU", prompt_tokens, tokens,
                       device=device, prefetch="off", **common),
            run_engine(model, f"{device}, hot set {budget} (router policy, copies on a side stream)", prompt_tokens,
                       tokens, device=device, gpu_expert_budget=budget, prefetch="router", **common)]
    ids = list(range(1, 17))
    ref = logits(model, ids, device="cpu", dtype="float32", **common)
    agree = [agreement(f"{device} float32 vs cpu float32", logits(model, ids, device=device, dtype="float32", **common),
                       ref),
             agreement(f"{device} bfloat16 vs cpu float32", logits(model, ids, device=device, dtype="bfloat16",
                                                                   **common), ref)]
    return runs, agree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="the bench model (default: made on first use in "
                                              "$TMPDIR/hybrid-gpu-check-bench)")
    p.add_argument("--threads", type=int, help="CPU threads for the expert kernels (default: physical cores)")
    p.add_argument("--tokens", type=int, default=32, help="tokens to decode per run")
    p.add_argument("--budget", default="25%", help="the hot-set run's --gpu-expert-budget")
    p.add_argument("--skip-tests", action="store_true", help="skip the CUDA tests (step 1)")
    a = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print(f"{sys.executable} cannot import torch: run `make gpu-check GPU_PY=/path/to/python` with a Python "
              f"that has a CUDA build of torch", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (make gpu-check needs a GPU with a CUDA build of torch)")
        return 0
    t0 = time.perf_counter()
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    model = a.model or Path(tempfile.gettempdir()) / "hybrid-gpu-check-bench"
    maker = None if a.model else start_bench_model(model)
    ok = True
    if not a.skip_tests:
        rc = run_cuda_tests(timeout_s=BUDGET_S / 2)
        print(f"[{time.perf_counter() - t0:.0f} s] CUDA tests: {'passed' if rc == 0 else f'FAILED (exit {rc})'}",
              flush=True)
        ok &= rc == 0
    if maker is not None:
        if maker.wait() != 0:
            print(f"making the bench model at {model} failed (exit {maker.returncode})")
            return 1
        print(f"[{time.perf_counter() - t0:.0f} s] bench model made at {model}", flush=True)
    runs, agree = check_model(model, "cuda", a.threads, a.tokens, a.budget)
    for r in runs:
        print(f"[{time.perf_counter() - t0:.0f} s] {r.describe()}", flush=True)
    for g in agree:
        print(g.describe())
    ok &= agree[0].rel <= AGREE_REL and agree[0].argmax_agree == 1.0
    total = time.perf_counter() - t0
    print(f"gpu-check {'passed' if ok else 'FAILED'} in {total:.0f} s"
          + (f" (over the {BUDGET_S // 60}-minute budget)" if total > BUDGET_S else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
