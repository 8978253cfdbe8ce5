"""Continuous batching and the prefix cache on the real engine (tiny models, float32 on the CPU):
a request's tokens and logits do not depend on what runs beside it or on reused cache blocks, and every
block comes back to the pool whatever way a request ends."""
import pytest
import torch

import hybrid
from hybrid.core.sampling import SamplingParams
from hybrid.runtime.engine import Request

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3], [1, 2, 3], list(range(40, 75)), [900, 12, 12, 12, 12],
           [7] * 19, list(range(200, 210)), [64, 65], list(range(500, 530))]


class Recorder:
    """A logits processor that keeps a copy of the logits of every step and changes nothing."""

    def __init__(self):
        self.logits = []

    def __call__(self, logits):
        self.logits.append(logits.clone())
        return logits

    def accept(self, token):
        pass


def _load(model, **kw):
    return hybrid.load(model, device="cpu", kv_block_size=4, **kw)


@pytest.mark.parametrize("kind,weights", [("k2", "fp8"), ("v3", "bf16"), ("noqlora", "bf16")])
def test_a_batch_of_8_equals_each_request_alone(tiny_models, kind, weights):
    eng = _load(tiny_models(kind, weights), max_batch=8, max_batch_tokens=24)
    alone = []
    for p in PROMPTS:
        rec = Recorder()
        alone.append((eng.generate(p, 10, stop_ids=(), processors=(rec,)), rec.logits))
    recs = [Recorder() for _ in PROMPTS]
    together = eng.generate_many([Request(p, 10, stop_ids=(), processors=(r,)) for p, r in zip(PROMPTS, recs)])
    assert eng.stats().scheduler.admitted >= 8
    for (tokens, logits), got, rec in zip(alone, together, recs):
        assert got == tokens
        assert max((a - b).abs().max().item() for a, b in zip(logits, rec.logits)) < 1e-4
    assert eng.blocks.in_use == 0


def test_prefix_reuse_gives_the_logits_of_a_cold_prefill(tiny_models):
    model = tiny_models("k2", "fp8")
    warm, cold = _load(model), _load(model, prefix_cache=False)
    system = list(range(100, 137))                       # 37 tokens: 9 full blocks of 4
    warm.generate(system + [1, 2], 3, stop_ids=())       # the first turn fills the cache
    turn2 = system + [1, 2] + [50, 51, 52, 53, 54]
    r_warm, r_cold = Recorder(), Recorder()
    assert warm.generate(turn2, 6, stop_ids=(), processors=(r_warm,)) == \
        cold.generate(turn2, 6, stop_ids=(), processors=(r_cold,))
    pc = warm.stats().prefix_cache
    assert pc.hit_tokens == 36 and cold.stats().prefix_cache.hit_tokens == 0
    assert max((a - b).abs().max().item() for a, b in zip(r_warm.logits, r_cold.logits)) < 1e-4


def test_seeded_sampling_repeats_alone_and_in_a_batch(tiny_models):
    eng = _load(tiny_models("k2", "fp8"))
    s = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    a = eng.generate(PROMPTS[0], 12, stop_ids=(), sampling=s)
    b = eng.generate(PROMPTS[0], 12, stop_ids=(), sampling=s)
    mixed = eng.generate_many([Request(PROMPTS[1], 12, SamplingParams(temperature=1.0), stop_ids=()),
                               Request(PROMPTS[0], 12, s, stop_ids=())])
    assert a == b == mixed[1]


def test_blocks_come_back_after_finish_cancel_and_error(tiny_models):
    eng = _load(tiny_models("k2", "fp8"), prefix_cache=False)
    total = eng.blocks.available
    eng.generate(PROMPTS[2], 5, stop_ids=())                          # finished
    assert eng.blocks.available == total
    n = []
    eng.generate(PROMPTS[2], 50, stop_ids=(), on_token=lambda t: n.append(t) or len(n) < 3)   # the caller stops it
    assert len(n) == 3 and eng.blocks.available == total

    class Boom(Recorder):
        def __call__(self, logits):
            raise RuntimeError("a processor failed")
    with pytest.raises(RuntimeError, match="a processor failed"):
        eng.generate_many([Request(PROMPTS[2], 5, stop_ids=(), processors=(Boom(),)), Request(PROMPTS[3], 5)])
    assert eng.blocks.available == total and not eng.busy
    seq = eng.submit(Request(PROMPTS[2], 20, stop_ids=()))
    eng.step()
    eng.cancel(seq)                                                    # cancelled while running
    eng.step()
    assert eng.blocks.available == total and not eng.busy and seq.payload.finish_reason == "cancelled"


def test_a_request_the_pool_cannot_hold_is_refused(tiny_models):
    eng = _load(tiny_models("k2", "fp8"), context=64)
    with pytest.raises(ValueError, match="whole pool holds 64 tokens"):
        eng.generate(list(range(1, 60)), 10)
