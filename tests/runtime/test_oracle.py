"""The runtime against transformers' DeepSeek-V3 on three tiny configs, BF16 and block-FP8 weights."""
import pytest
import torch

import hybrid
from tests.oracle import oracle_greedy, oracle_logits, oracle_model

PROMPT = [5, 77, 300, 12, 990, 41, 41, 7, 512, 3, 64, 200]


@pytest.fixture(scope="module")
def oracles(tiny_models, tmp_path_factory):
    cache = {}

    def get(kind, weights):
        if (kind, weights) not in cache:
            d = tiny_models(kind, weights)
            cache[kind, weights] = (d, oracle_model(d, tmp_path_factory.mktemp("oracle")))
        return cache[kind, weights]
    return get


# BF16 weights are slow-only here: every config runs in the fast suite with FP8 weights, and BF16 weights are
# checked against the same oracle by test_engine_experts (k2 and v3, on the CPU kernels).
@pytest.mark.parametrize("weights", [pytest.param("bf16", marks=pytest.mark.slow), "fp8"])
@pytest.mark.parametrize("kind", ["k2", "v3", "noqlora"])
def test_logits_and_greedy_match_transformers(oracles, kind, weights):
    model_dir, oracle = oracles(kind, weights)
    eng = hybrid.load(model_dir, device="cpu", experts="torch")
    ours = eng.forward(PROMPT)
    ref = oracle_logits(oracle, PROMPT)
    assert ours.shape == ref.shape == (len(PROMPT), eng.cfg.vocab_size)
    assert (ours - ref).abs().max().item() < 1e-4
    assert eng.generate(PROMPT, 16, stop_ids=()) == oracle_greedy(oracle, PROMPT, 16)


def test_cached_decode_equals_recomputation(tiny_models):
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu", experts="torch")
    new = eng.generate(PROMPT, 10, stop_ids=())
    seq = PROMPT + new
    full = eng.forward(seq)
    # Each generated token is the argmax of the full recomputation at the position before it.
    assert full[len(PROMPT) - 1:-1].argmax(-1).tolist() == new


def test_absorbed_decode_equals_prefill_form(tiny_models):
    """The last three tokens one by one over the paged cache, in MLA's absorbed form and in the expanded one."""
    from hybrid.runtime.batch import build_batch
    from hybrid.runtime.scheduler import Sequence
    eng = hybrid.load(tiny_models("v3", "bf16"), device="cpu", experts="torch")
    bs = eng.blocks.block_size
    outs = {}
    with torch.inference_mode():
        for absorbed in (False, True):
            seq = Sequence(0, len(PROMPT), list(PROMPT), len(PROMPT))
            assert eng.blocks.grow(seq.table, len(PROMPT))
            eng.model.hidden(build_batch([(seq, len(PROMPT) - 3)], bs, eng.device), eng.kv)
            seq.n_computed = len(PROMPT) - 3
            steps = []
            for _ in range(3):
                steps.append(eng.model.hidden(build_batch([(seq, 1)], bs, eng.device, absorbed=absorbed), eng.kv))
                seq.n_computed += 1
            outs[absorbed] = torch.cat(steps)
            eng.blocks.release(seq.table)
    assert (outs[True] - outs[False]).abs().max().item() < 1e-5
