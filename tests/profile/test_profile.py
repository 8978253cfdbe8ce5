"""Profiler: replay of hand-made traces, placement files, the report, and the `hybrid profile` command line."""
import json
import re

import numpy as np
import pytest

from hybrid.profile.analysis import analyze, coverage, lookahead, placement, replay
from hybrid.cli.profile import main as profile_main
from hybrid.core.placement_file import PlacementError, read_placement
from hybrid.profile.report import write_report
from hybrid.profile.synth import params_with, synthesize
from hybrid.profile.trace import TraceModel, from_arrays, read_trace

ONE_LAYER = TraceModel(n_experts=4, top_k=1, moe_layers=(0,), num_hidden_layers=1)


def one_layer_trace(seq, n_prompt=0, steps=None):
    ids = np.array(seq).reshape(-1, 1, 1)
    return from_arrays(ONE_LAYER, [(ids, n_prompt)], "hand", steps=steps)


def rates(trace, fraction=0.25):
    return {p: v[fraction]["hit_rate"] for p, v in replay(trace, fractions=(fraction,)).items()}


def test_replay_of_a_hand_made_decode_trace():
    # One layer, 4 experts, hot set of 1 (25 %); decode tokens route to 0, 0, 1, 1, 0.
    #   static: the trace's top expert is 0 (3 uses): hits at tokens 1, 2, 5              -> 3/5
    #   lru:    miss (load 0), hit, miss (0 -> 1), hit, miss                            -> 2/5
    #   lfu:    miss (load 0), hit, miss (1 has 1 use < 2), miss (2 == 2: no swap), hit  -> 2/5
    r = rates(one_layer_trace([0, 0, 1, 1, 0]))
    assert r["static"] == pytest.approx(3 / 5)
    assert r["lru"] == pytest.approx(2 / 5)
    assert r["lfu"] == pytest.approx(2 / 5)


def test_replay_judges_a_step_before_loading():
    # A 3-token prefill step [0, 0, 1] then decode 0, 1. LRU, capacity 1: nothing is resident during the
    # prefill step (3 misses), it then loads the most recent miss, 1; decode 0 misses (1 -> 0), decode 1
    # misses: 0/5. Static (0 has 3 uses): hits at tokens 1, 2, 4 -> 3/5.
    r = rates(one_layer_trace([0, 0, 1, 0, 1], n_prompt=3, steps=[[3, 1, 1]]))
    assert r["lru"] == 0.0 and r["static"] == pytest.approx(3 / 5)


def test_replay_starts_each_request_afresh_for_the_router():
    # Request A prefills [0, 0, 0]; request B prefills [1] and decodes 1. Router, capacity 1: A loads 0 after
    # its step (3 misses). end_request() clears A's counts, so B's prefill (a miss) replaces 0 by 1 and B's
    # decode token hits: 1/5. Without the reset, 0's count of 3 would keep 1 out: 0/5.
    ids = np.array([0, 0, 0, 1, 1]).reshape(-1, 1, 1)
    t = from_arrays(ONE_LAYER, [(ids[:3], 3), (ids[3:], 1)], "hand")
    assert rates(t)["router"] == pytest.approx(1 / 5)


def test_static_replay_equals_global_coverage():
    t = synthesize("kimi-k2", params_with(n_requests=4, prompt_tokens=64, new_tokens=16), n_layers=2)
    cov = coverage(t, (0.05, 0.25))["global"]
    rep = replay(t, policies=("static",), fractions=(0.05, 0.25))["static"]
    for f in (0.05, 0.25):
        assert rep[f]["hit_rate"] == pytest.approx(cov[f])      # two computations, one answer
        assert rep[f]["loads_per_token"] == 0.0


def test_transfer_budget_limits_replay_loads():
    t = synthesize("kimi-k2", params_with(n_requests=2, prompt_tokens=32, new_tokens=32), n_layers=1)
    free = replay(t, policies=("lru",), fractions=(0.1,))["lru"][0.1]
    tight = replay(t, policies=("lru",), fractions=(0.1,), loads_per_token=0.25)["lru"][0.1]
    assert tight["loads_per_token"] <= 0.25 + 1e-9 < free["loads_per_token"]
    assert tight["hit_rate"] < free["hit_rate"]


def test_replay_splits_loads_by_phase():
    from hybrid.profile.analysis import replay
    t = synthesize("kimi-k2", params_with(n_requests=2, prompt_tokens=64, new_tokens=32), n_layers=2)
    r = replay(t, ("lru",), (0.05,), loads_per_token=0.25)["lru"][0.05]
    decode_tokens = 2 * 32
    total = r["decode_loads_per_token"] * decode_tokens + r["prefill_loads_per_token"] * (t.n_tokens - decode_tokens)
    assert total == pytest.approx(r["loads_per_token"] * t.n_tokens)
    assert 0 <= r["prefill_hit_rate"] <= 1 and np.isfinite(r["decode_hit_rate"])


def test_hints_are_scored_when_present():
    t = synthesize("kimi-k2", params_with(n_requests=2, prompt_tokens=16, new_tokens=8), n_layers=2)
    t.hints = t.ids.copy()
    assert lookahead(t, distances=())["hints"] == {"precision": 1.0, "recall": 1.0}


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    t = synthesize("kimi-k2", params_with(n_requests=4, prompt_tokens=64, new_tokens=16), n_layers=3)
    out = tmp_path_factory.mktemp("report")
    files = write_report(t, analyze(t, fractions=(0.05, 0.1, 0.25), max_layers=2), out, fraction=0.1)
    return t, out, files


def test_placement_round_trips(small_report):
    t, out, _ = small_report
    got = read_placement(out / "placement.json", expect=t.model)
    assert got == placement(t, 0.1)
    assert sorted(got) == [1, 2, 3] and all(len(v) == 38 for v in got.values())
    counts = t.layer_counts()
    for i, layer in enumerate(t.model.moe_layers):      # the hot set is the layer's 38 most used experts
        assert counts[i, got[layer]].min() >= np.delete(counts[i], got[layer]).max()


def test_logical_count_file_for_ktransformers(small_report):
    t, out, _ = small_report
    lc = np.array(json.loads((out / "logical_count.json").read_text())["logical_count"])
    assert lc.shape == (1, 61, 384)
    assert lc[0, 0].sum() == 0 and lc[0, 4:].sum() == 0                   # dense layer 0, layers not traced
    assert np.array_equal(lc[0, 1:4], t.layer_counts())


def test_report_renders_the_plots_it_names(small_report):
    _, out, files = small_report
    text = files["report"].read_text()
    named = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(named) == {"coverage.png", "heatmap.png", "hit_rate.png"}
    for name in named:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lru |" in text and "| router |" in text and "## Look-ahead" in text


def test_bad_placement_files_are_refused(small_report, tmp_path):
    t, out, _ = small_report
    with pytest.raises(PlacementError, match="384 experts.*this model has 3 MoE layers x 16"):
        read_placement(out / "placement.json", expect=TraceModel(16, 8, (1, 2, 3), 61))
    doc = json.loads((out / "placement.json").read_text())
    doc["layers"]["1"] = [5, 5]
    (tmp_path / "dup.json").write_text(json.dumps(doc))
    with pytest.raises(PlacementError, match="layer 1 lists an expert twice"):
        read_placement(tmp_path / "dup.json")
    (tmp_path / "trunc.json").write_text((out / "placement.json").read_text()[:100])
    with pytest.raises(PlacementError, match="not valid JSON"):
        read_placement(tmp_path / "trunc.json")


# ---- command line ----------------------------------------------------------------------------------------
def test_cli_record_writes_trace_and_report(tiny_models, tmp_path, capsys):
    model = tiny_models("k2", "fp8")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi there"}]}) + "\n"
                       + json.dumps({"prompt_ids": [1, 2, 3, 4]}) + "\n")
    rc = profile_main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                       "--max-new-tokens", "3", "--experts", "torch", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    t = read_trace(tmp_path / "o" / "trace.npz")
    assert t.n_requests == 2 and t.requests()[1]["prompt_tokens"] == 4
    assert t.tokens[t.req[1]:t.req[1] + 4].tolist() == [1, 2, 3, 4]
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "placement.json").is_file()
    # analyze against the wrong model: a clear error, exit 2
    other = tiny_models("v3", "fp8")
    rc = profile_main(["analyze", str(tmp_path / "o" / "trace.npz"), "--out", str(tmp_path / "a"),
                       "--model", str(other)])
    assert rc == 2 and "profile this model again" in capsys.readouterr().err


def test_cli_empty_prompt_file_is_a_clear_error(tiny_models, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    rc = profile_main(["record", "--model", str(tiny_models("k2", "fp8")), "--prompts", str(tmp_path / "empty.txt"),
                       "--out", str(tmp_path / "o"), "--experts", "torch", "--device", "cpu"])
    assert rc == 2 and "holds no prompts" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_synth_then_analyze(tmp_path, capsys):
    rc = profile_main(["synth", "--config", "kimi-k2", "--out", str(tmp_path / "s"), "--requests", "2",
                       "--prompt-tokens", "32", "--new-tokens", "8", "--layers", "2", "--no-report"])
    assert rc == 0 and not (tmp_path / "s" / "report.md").exists()
    rc = profile_main(["analyze", str(tmp_path / "s" / "trace.npz"), "--out", str(tmp_path / "a"),
                       "--gpu-expert-budget", "5%", "--replay-layers", "1"])
    assert rc == 0, capsys.readouterr().err
    assert all(len(v) == 19 for v in read_placement(tmp_path / "a" / "placement.json").values())
    (tmp_path / "cut.npz").write_bytes((tmp_path / "s" / "trace.npz").read_bytes()[:300])
    rc = profile_main(["analyze", str(tmp_path / "cut.npz"), "--out", str(tmp_path / "b")])
    assert rc == 2 and "truncated" in capsys.readouterr().err
