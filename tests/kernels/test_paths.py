"""Choosing the CPU kernels' instruction set: auto from the compile target's features, forcing by
HYBRID_CPU_KERNELS / set_cpu_kernels, the errors and warnings; and the AVX2 kernels compiled for an AVX2-only
CPU (NUMBA_CPU_NAME=znver2 NUMBA_CPU_FEATURES=-avx512f, in a subprocess) pass their tests with no AVX-512 instruction in their code."""
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from cpu_experts import ir, paths
from hybrid.core.options import RuntimeOptions
from tests.kernels.conftest import RUNNABLE

ZEN2_ENV = {"NUMBA_CPU_NAME": "znver2", "NUMBA_CPU_FEATURES": "-avx512f"}    # Zen 2: AVX2, FMA, F16C, no AVX-512
ZEN2 = all(os.environ.get(k) == v for k, v in ZEN2_ENV.items())


def _as_cpu(monkeypatch, env: dict) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(paths.ENV, raising=False)
    paths.warn_plain.cache_clear()
    yield
    monkeypatch.undo()                  # the test's environment first: resolving "auto" reads it
    paths.set_cpu_kernels("auto")


def test_option_choices_are_the_kernel_choices():
    f = next(f for f in fields(RuntimeOptions) if f.name == "cpu_kernels")
    assert f.metadata["choices"] == paths.CPU_KERNELS


def test_auto_takes_the_first_runnable_isa(monkeypatch):
    assert paths.active_isa() == (RUNNABLE[0] if RUNNABLE else "plain")
    _as_cpu(monkeypatch, ZEN2_ENV)
    assert paths.active_isa() == "avx2"
    assert ir.missing("avx512") == ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vbmi")


def test_forcing_an_isa_the_cpu_lacks_names_the_missing_features(monkeypatch):
    _as_cpu(monkeypatch, ZEN2_ENV)
    monkeypatch.setenv(paths.ENV, "avx512")
    with pytest.raises(ValueError, match="avx512f, avx512bw, avx512vl, avx512vnni, avx512vbmi"):
        paths.active_isa()
    with pytest.raises(ValueError, match="avx512vnni"):
        paths.set_cpu_kernels("avx512")
    with pytest.raises(ValueError, match="use one of auto, avx512, avx2, plain"):
        paths.set_cpu_kernels("sse4")


@pytest.mark.parametrize("choice", [*RUNNABLE, "plain"])
def test_forced_isa_is_used(monkeypatch, choice):
    monkeypatch.setenv(paths.ENV, choice)
    assert paths.active_isa() == choice
    assert paths.choose_path("bf16", (256, 128)) == choice
    assert paths.choose_path("int4", (256, 128)) == ("plain" if choice == "plain" else "int4-int8")
    other = "plain" if choice != "plain" else (RUNNABLE or ["plain"])[0]
    assert paths.set_cpu_kernels(other) == other             # the option wins over the environment
    assert paths.set_cpu_kernels("auto") == choice


def test_plain_path_warns_why(monkeypatch, capsys):
    _as_cpu(monkeypatch, {"NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": "+sse2"})    # none of the features
    assert paths.choose_path("fp8", (256, 128)) == "plain"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: CPU kernels: plain (portable, 35-100x slower) because the CPU lacks avx2, fma, f16c "
                   "(the AVX2 kernels need avx2, fma, f16c)"]
    _as_cpu(monkeypatch, ZEN2_ENV)
    assert paths.choose_path("fp8", (256, 96)) == "plain"
    assert "fp8 input sizes (256, 96) are not multiples of 64" in capsys.readouterr().err


@pytest.mark.skipif("avx2" not in RUNNABLE or ZEN2, reason="needs a host that runs the AVX2 kernels")
def test_avx2_kernels_under_znver2(tmp_path):
    """The fast-path kernel tests, compiled for Zen 2 (LLVM may use no AVX-512 instruction), in a subprocess
    with an empty Numba cache (code loaded from the cache has no assembly listing to inspect)."""
    env = {**os.environ, **ZEN2_ENV, "PYTHONPATH": os.getcwd(), "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop(paths.ENV, None)
    tests = ["tests/kernels/test_paths.py::test_no_zmm_registers_under_znver2",
             "tests/kernels/test_cpu_experts_int8.py::test_vnni_kernels_equal_the_emulation",
             "tests/kernels/test_cpu_experts.py::test_fast_drivers_on_odd_row_ranges"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not shape1", *tests],
                       env=env, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


@pytest.mark.skipif(not ZEN2, reason="runs inside test_avx2_kernels_under_znver2 (the Zen 2 environment)")
def test_no_zmm_registers_under_znver2():
    from cpu_experts import bf16_avx512, fp8_avx512, int4_vnni
    from cpu_experts.experts import ExpertLayer, run_fast
    from cpu_experts.pool import RowPool
    from quant.store import LayerStore, StoreSpec
    assert paths.active_isa() == "avx2"
    rng = np.random.default_rng(0)
    for fmt, mod in (("int4", int4_vnni), ("fp8", fp8_avx512), ("bf16", bf16_avx512)):
        src = {k: rng.standard_normal((128, 256) if k != "down" else (256, 128), dtype=np.float32)
               for k in ("gate", "up", "down")}
        store = LayerStore.build(StoreSpec(fmt, 256, 128), 1, lambda e: src)
        L = ExpertLayer(store, paths.choose_path(fmt, (256, 128)))
        out = np.zeros((1, 256), np.float32)
        run_fast(RowPool(1), L, np.zeros(1, np.int64), np.array([0, 1], np.int64), np.zeros(1, np.int64),
                 np.ones(1, np.float32), np.ones((1, 256), np.float32), out)
        for fn in (mod.gateup, mod.down):
            # the library also holds the AVX-512 kernels of the table (never called here): check the rest
            code = [f for f in _functions("\n".join(fn.inspect_asm().values())) if "_avx512_" not in f[0]]
            assert any("_avx2_" in name and "vfmadd" in body and "ymm" in body for name, body in code), fmt
            assert not [name for name, body in code if "zmm" in body], fmt


def _functions(asm: str) -> list[tuple[str, str]]:
    """(name, code) of each function in an assembly listing (from its label to its .size line)."""
    out = []
    for part in asm.split("\t.type\t")[1:]:
        name = part.split(",", 1)[0]
        if "@function" in part.split("\n", 1)[0]:
            out.append((name, part.split(f"\t.size\t{name},", 1)[0]))
    return out
