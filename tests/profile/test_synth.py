"""The synthetic K2 routing model: its shape, determinism, calibration targets and the properties it claims."""
import numpy as np
import pytest

from hybrid.profile.analysis import coverage, lookahead, reuse_distance
from hybrid.profile.synth import DEFAULT_PARAMS, PRESETS, TARGETS, TOLERANCE, params_with, synthesize

SMALL = params_with(n_requests=6, prompt_tokens=96, new_tokens=32)


def test_k2_shape_and_valid_routing():
    t = synthesize("kimi-k2", SMALL, n_layers=3)
    assert PRESETS["kimi-k2"].n_experts == 384 and len(PRESETS["kimi-k2"].moe_layers) == 60
    assert t.ids.shape == (6 * 128, 3, 8) and t.model.moe_layers == (1, 2, 3)
    assert t.ids.min() >= 0 and t.ids.max() < 384
    srt = np.sort(t.ids, axis=2)
    assert not (srt[..., 1:] == srt[..., :-1]).any()                # k distinct experts per token
    assert t.requests() == [{"prompt_tokens": 96, "new_tokens": 32}] * 6
    assert np.diff(t.step).tolist()[:2] == [96, 1]                  # prefill one step, then one per token


def test_same_seed_same_trace_other_seed_differs():
    a = synthesize("kimi-k2", SMALL, n_layers=2)
    b = synthesize("kimi-k2", SMALL, n_layers=2)
    c = synthesize("kimi-k2", params_with(n_requests=6, prompt_tokens=96, new_tokens=32, seed=1), n_layers=2)
    assert np.array_equal(a.ids, b.ids) and not np.array_equal(a.ids, c.ids)


def test_reproduces_the_ktransformers_calibration_targets():
    # The calibrated workload (32 requests of 768 + 256 tokens) on 3 of the 60 layers: the layers are
    # statistically alike, and the in-sample global figure depends on the number of requests, so that stays.
    t = synthesize("kimi-k2", DEFAULT_PARAMS, n_layers=3)
    cov = coverage(t, (0.10,))
    assert abs(cov["global"][0.10] - TARGETS["global_top10"]) <= TOLERANCE
    assert abs(cov["request"][0.10] - TARGETS["request_top10"]) <= TOLERANCE


def test_layer_affinity_makes_the_next_layer_predictable():
    with_aff = lookahead(synthesize("kimi-k2", params_with(n_requests=8, prompt_tokens=200, new_tokens=56),
                                    n_layers=3), distances=(1, 2))
    without = lookahead(synthesize("kimi-k2", params_with(n_requests=8, prompt_tokens=200, new_tokens=56,
                                                          layer_affinity=0.0), n_layers=3), distances=(1,))
    assert with_aff["L+1"]["affinity"]["precision"] > 3 * with_aff["L+1"]["baseline"]["precision"]
    assert with_aff["L+2"]["affinity"]["precision"] < with_aff["L+1"]["affinity"]["precision"]
    assert without["L+1"]["affinity"]["precision"] < 1.5 * without["L+1"]["baseline"]["precision"]


def test_segments_add_token_to_token_reuse():
    p = dict(n_requests=6, prompt_tokens=200, new_tokens=56)
    with_seg = reuse_distance(synthesize("kimi-k2", params_with(**p), n_layers=2))
    no_seg = reuse_distance(synthesize("kimi-k2", params_with(**p, segment_skew=0.0), n_layers=2))
    assert with_seg["d1"] > 1.1 * no_seg["d1"]


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="unknown config 'kimi'"):
        synthesize("kimi")
    with pytest.raises(ValueError, match="layer_affinity"):
        synthesize("kimi-k2", params_with(layer_affinity=1.0), n_layers=1)
    with pytest.raises(ValueError, match="n_layers must lie in 1..60"):
        synthesize("kimi-k2", SMALL, n_layers=61)
