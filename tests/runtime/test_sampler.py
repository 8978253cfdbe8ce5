"""Sampling: SamplingParams (one validation for CLI, API and server), the per-request Sampler (penalties,
processors, logprobs, top-p, seeds) and what generate reports."""
import math

import pytest
import torch

import hybrid
from hybrid.core.sampling import SamplingError, SamplingParams
from hybrid.runtime.sampler import Sampler, sample

PROMPT = [5, 17, 300, 42, 7, 99, 1000, 3]


@pytest.fixture(scope="module")
def tiny_model(tiny_models):
    return tiny_models("k2", "fp8")


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.1), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("frequency_penalty", 2.5),
    ("presence_penalty", -math.inf), ("logprobs", 21), ("logprobs", -1), ("seed", 1.5), ("seed", True),
])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field and field in str(e.value)


def test_greedy_is_argmax_and_penalties_change_the_choice():
    logits = torch.tensor([2.0, 1.6, -1.0, 0.0])
    plain = Sampler(SamplingParams())
    assert [plain(logits).token for _ in range(3)] == [0, 0, 0]
    pen = Sampler(SamplingParams(frequency_penalty=0.5))
    # 0 once: 2.0 - 0.5 = 1.5 < 1.6 -> 1; then 1 once: 1.6 - 0.5 = 1.1 < 1.5 -> 0; then 0 twice: 1.0 -> 1 (1.1)
    assert [pen(logits).token for _ in range(4)] == [0, 1, 0, 1]
    pres = Sampler(SamplingParams(presence_penalty=0.5))
    assert [pres(logits).token for _ in range(3)] == [0, 1, 0]   # presence counts once: 1.5 vs 1.1 -> 0


def test_logprobs_are_the_log_softmax_with_the_top_alternatives():
    logits = torch.tensor([0.5, 3.0, 1.0, -2.0])
    s = Sampler(SamplingParams(logprobs=2))(logits)
    lp = torch.log_softmax(logits, -1)
    assert s.token == 1 and s.logprob == pytest.approx(float(lp[1]))
    assert [t for t, _ in s.top] == [1, 2] and s.top[1][1] == pytest.approx(float(lp[2]))
    assert Sampler(SamplingParams())(logits).logprob is None


class _Forbid:
    """A processor that forbids token `bad` and records what it saw accepted."""

    def __init__(self, bad):
        self.bad, self.accepted = bad, []

    def __call__(self, logits):
        logits[self.bad] = -math.inf
        return logits

    def accept(self, token):
        self.accepted.append(token)


def test_processors_mask_before_the_choice_and_learn_it():
    proc = _Forbid(1)
    s = Sampler(SamplingParams(temperature=1.0, seed=3), (proc,))
    toks = [s(torch.tensor([0.0, 9.0, 0.0])).token for _ in range(20)]
    assert 1 not in toks and proc.accepted == toks
    with pytest.raises(ValueError, match="every token was excluded"):
        Sampler(SamplingParams(temperature=1.0), (_Forbid(0),))(torch.tensor([0.0]))


def test_seeded_sampling_repeats():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    a, b = (Sampler(SamplingParams(temperature=0.9, top_p=0.9, seed=11)) for _ in range(2))
    assert [a(logits).token for _ in range(30)] == [b(logits).token for _ in range(30)]


def test_generate_reports_logprobs_of_the_decoded_tokens(tiny_model):
    eng = hybrid.load(tiny_model, device="cpu", experts="fp8")
    seen = []
    new = eng.generate(PROMPT, 6, stop_ids=(), sampling=SamplingParams(logprobs=3), on_sample=seen.append)
    assert [s.token for s in seen] == new
    full = torch.log_softmax(eng.forward(PROMPT + new), -1)        # position i predicts token i + 1
    for i, s in enumerate(seen):
        assert s.logprob == pytest.approx(float(full[len(PROMPT) - 1 + i, s.token]), abs=1e-4)
        assert s.top[0][0] == s.token                               # greedy: the chosen token is the best


def test_api_and_cli_reject_non_finite_values(tiny_model, capsys):
    eng = hybrid.load(tiny_model, device="cpu", experts="fp8")
    with pytest.raises(SamplingError, match="temperature must be a finite number"):
        eng.generate(PROMPT, 2, temperature=math.nan)
    from hybrid.cli import main
    assert main(["generate", "--model", str(tiny_model), "--prompt-ids", "1,2", "--temperature", "nan"]) == 2
    assert "temperature must be a finite number" in capsys.readouterr().err


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


@pytest.mark.parametrize("temperature,top_p", [(1e-300, 1.0), (5e-5, 1.0), (1.0, 1e-300), (1e-300, 1e-300)])
def test_tiny_valid_temperature_and_top_p_sample_the_most_likely_token(temperature, top_p):
    """Issue 28 item 11: tiny values pass validation and then act as greedy / a one-token nucleus (they used
    to overflow into 'every token was excluded')."""
    logits = torch.tensor([0.5, 3.0, 2.999, -1.0])
    for seed in range(5):
        assert sample(logits, temperature, top_p, torch.Generator().manual_seed(seed)) == 1


def test_a_small_temperature_that_is_not_greedy_still_draws_without_overflow():
    logits = torch.tensor([100.0, 100.0, -50.0])
    got = {sample(logits, 1e-3, 1.0, torch.Generator().manual_seed(s)) for s in range(40)}
    assert got == {0, 1}
