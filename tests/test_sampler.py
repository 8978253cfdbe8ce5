"""Sampling: top-p keeps the nucleus, greedy at temperature 0, and a seed reproduces a sampled generation."""
import pytest
import torch

import hybrid
from hybrid.runtime.sampler import sample


def test_sampler_top_p_keeps_the_nucleus():
    logits = torch.tensor([5.0, 4.0, -10.0, -10.0])
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, 1.0, 0.5, g) for _ in range(50)}
    assert picks == {0}                      # the first token alone holds > 50 % of the mass
    picks = {sample(logits, 1.0, 0.99, g) for _ in range(200)}
    assert picks == {0, 1}
    assert sample(logits, 0.0) == 0
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, 0.0)


def test_seeded_sampling_is_reproducible(tiny_models):
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu", experts="torch")
    a = eng.generate([1, 2, 3], 12, temperature=1.0, seed=7, stop_ids=())
    b = eng.generate([1, 2, 3], 12, temperature=1.0, seed=7, stop_ids=())
    c = eng.generate([1, 2, 3], 12, temperature=1.0, seed=8, stop_ids=())
    assert a == b != c
