"""The CUDA path: same interfaces, checked against the CPU stand-in. Skipped without CUDA."""
import pytest
import torch

import hybrid

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPT = [5, 77, 300, 12, 990, 41]


def test_cuda_float32_matches_cpu(tiny_models):
    d = tiny_models("k2", "fp8")
    cpu = hybrid.load(d, device="cpu", experts="torch")
    gpu = hybrid.load(d, device="cuda", experts="torch", dtype="float32")
    assert gpu.model.lm_head.weight.is_cuda
    assert (cpu.forward(PROMPT) - gpu.forward(PROMPT)).abs().max().item() < 1e-3
    assert cpu.generate(PROMPT, 8, stop_ids=()) == gpu.generate(PROMPT, 8, stop_ids=())


def test_cuda_bf16_auto_dtype_runs_with_cpu_experts(tiny_models):
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cuda")
    assert eng.dtype == torch.bfloat16
    out = eng.generate(PROMPT, 4, stop_ids=())
    assert len(out) == 4 and eng.stats().expert_activations.cpu > 0
