"""The engine's generation contract on the tiny model: stop ids end a generation, bad ids and contexts are refused."""
import json
import pytest

import hybrid


def test_stop_ids_end_generation(tiny_models):
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu", experts="torch")
    free = eng.generate([1, 2, 3], 8, stop_ids=())
    stopped = eng.generate([1, 2, 3], 8, stop_ids=(free[2],))
    assert stopped == free[: free.index(free[2]) + 1]


def test_bad_ids_and_context(tiny_models):
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu", experts="torch")
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        eng.forward([1, 5000])
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], 3)
    with pytest.raises(ValueError, match="exceeds the context of 8192"):
        eng.generate([1] * 8190, 5)


def test_stats_is_a_typed_record_whose_json_keeps_the_documented_keys(tiny_models):
    from hybrid.runtime.stats import EngineStats
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu", prefetch="off")
    eng.generate([1, 2, 3], 3, stop_ids=())
    s = eng.stats()
    assert isinstance(s, EngineStats) and s.decode_tokens == 2 and s.prefill_tokens == 3
    assert s.expert_activations.total == s.expert_activations.cpu > 0 and s.expert_activations.share("cpu") == 1.0
    d = json.loads(json.dumps(s.to_dict()))
    assert {"prefill_tokens", "decode_tokens_per_s", "expert_activations", "experts", "dense", "device",
            "expert_backend", "scheduler", "kv_blocks", "prefix_cache", "devices"} <= set(d)
    assert d["expert_activations"]["cpu"] == s.expert_activations.cpu and d["scheduler"]["finished"] == 1
    assert d["devices"][0]["kv_bytes"] == eng.kv.nbytes


@pytest.mark.parametrize("forced", ["avx2", "plain"])
def test_the_cpu_kernels_are_named_in_stats_json_summary_and_metrics(tiny_models, forced, monkeypatch, capsys):
    """Issue 25 item 2: the instruction set chosen is reported everywhere a user looks."""
    from cpu_experts import ir
    from hybrid.cli import main
    if forced == "avx2" and not ir.supported("avx2"):
        pytest.skip("this CPU lacks AVX2")
    monkeypatch.setenv("HYBRID_CPU_KERNELS", forced)
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu", prefetch="off")
    assert eng.stats().cpu_kernels == forced == eng.stats().to_dict()["cpu_kernels"]
    assert main(["generate", "--model", str(tiny_models("k2", "fp8")), "--prompt-ids", "1,2", "--max-new-tokens",
                 "2", "--cpu-kernels", forced, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"CPU kernels: {forced}" in err and f"CPU kernels {forced}" in err
    from hybrid.serve.metrics import RequestCounter, prometheus_text

    class W:
        engine_stats, counts = eng.stats(), {k: 0 for k in ("finished", "cancelled", "failed", "prompt_tokens",
                                                           "completion_tokens")}

        def depth(self):
            return 0, 0
    assert f'hybrid_cpu_kernels_info{{isa="{forced}"}} 1' in prometheus_text(W(), RequestCounter())
