"""Routing traces: recording equals the engine's routing, file round trip, clear errors, SGLang importers."""
import base64
import json

import numpy as np
import pytest
import torch

import hybrid
from hybrid.profile.trace import DECODE, PREFILL, Trace, TraceError, TraceModel, read_trace, record, write_trace
from hybrid.profile.trace_import import from_logical_count, read_routed_experts, read_sglang_dump


@pytest.fixture(scope="module")
def engine(tiny_models):
    return hybrid.load(tiny_models("k2", "fp8"), device="cpu", experts="torch")


def test_recorded_trace_equals_the_engines_routing(engine, tmp_path):
    seen = []            # an independent listener: what the engine routed, call by call
    remove = engine.add_route_listener(lambda layer, ids, w, phase: seen.append((layer, ids.clone(), w.clone(), phase)))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300, 301, 302]]
    engine.scheduler.max_batch_tokens = 4       # two prefill steps for the first prompt
    try:
        trace = record(engine, prompts, max_new_tokens=4)
    finally:
        remove()
        engine.scheduler.max_batch_tokens = 512
    back = read_trace(write_trace(trace, tmp_path / "t.npz"), expect=engine.cfg)

    moe = engine.cfg.moe_layers
    assert back.model.moe_layers == tuple(moe) and back.ids.shape[1:] == (len(moe), engine.cfg.num_experts_per_tok)
    # steps: the listener's calls grouped per forward step (one call per MoE layer per step)
    assert len(seen) == len(moe) * (len(back.step) - 1)
    for s in range(len(back.step) - 1):
        a, b = back.step[s], back.step[s + 1]
        for j, layer in enumerate(moe):
            lay, ids, w, phase = seen[s * len(moe) + j]
            assert lay == layer
            np.testing.assert_array_equal(back.ids[a:b, j], ids.numpy())
            np.testing.assert_allclose(back.weights[a:b, j].astype(np.float32), w.numpy(), rtol=1e-3, atol=1e-4)
            assert set(back.phase[a:b].tolist()) == {PREFILL if phase == "prefill" else DECODE}
    # requests: prompt positions are prefill, each fed-back new token one decode step
    assert back.n_requests == 2
    assert [r["prompt_tokens"] for r in back.requests()] == [7, 3]
    assert np.diff(back.step).tolist()[:2] == [4, 3]            # prefill chunks of the first prompt
    first = back.tokens[back.req[0]:back.req[1]].tolist()
    assert first[:7] == prompts[0] and len(first) == 7 + back.requests()[0]["new_tokens"]


def _toy(n_tokens=6, E=8, k=2, layers=(1, 2)):
    m = TraceModel(E, k, layers, 3)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(n_tokens * len(layers))]).reshape(n_tokens, len(layers), k)
    return Trace(m, ids.astype(np.int16), np.array([0, 0, 0, 1, 1, 1], np.uint8), np.array([0, 6]),
                 np.array([0, 3, 4, 5, 6]))


def test_truncated_trace_is_a_clear_error(tmp_path):
    p = write_trace(_toy(), tmp_path / "t.npz")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated"):
        read_trace(p)


def test_trace_from_another_model_is_refused(tmp_path):
    p = write_trace(_toy(), tmp_path / "t.npz")
    with pytest.raises(TraceError, match="8 experts.*this model has 2 MoE layers x 16 experts.*profile this model"):
        read_trace(p, expect=TraceModel(16, 2, (1, 2), 3))


def test_other_files_and_versions_are_refused(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, ids=np.zeros((1, 2, 2)))
    with pytest.raises(TraceError, match="no header"):
        read_trace(p)
    with pytest.raises(FileNotFoundError, match="profile record"):
        read_trace(tmp_path / "missing.npz")
    t = _toy()
    t.ids[0, 0, 0] = 8                       # expert 8 of 8
    with pytest.raises(TraceError, match="outside -1..7"):
        write_trace(t, tmp_path / "bad.npz")


def test_sglang_per_token_dump_maps_physical_ids_and_splits_requests(tmp_path):
    m = TraceModel(4, 2, (1, 2), 3)          # layer 0 dense
    p2l = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 2]])  # 6 physical -> 4 logical

    def rec(pid, phys, positions, mode):
        a = torch.full((3, len(positions), 2), -1, dtype=torch.int32)
        a[1:] = torch.tensor(phys, dtype=torch.int32)
        return {"forward_pass_id": pid, "topk_ids_of_layer": a, "positions": positions, "forward_mode": mode}
    dump = {"records": [rec(0, [[[0, 1], [4, 2]], [[5, 3], [0, 1]]], [0, 1], 1),    # request A prefill
                        rec(1, [[[2, 3]], [[0, 4]]], [2], 2),                       # request A decode
                        rec(2, [[[1, 0]], [[1, 2]]], [0], 1)],                      # request B prefill
            "last_physical_to_logical_map": p2l}
    torch.save(dump, tmp_path / "d.pt")
    t = read_sglang_dump(tmp_path / "d.pt", m)
    assert t.n_requests == 2 and t.requests() == [{"prompt_tokens": 2, "new_tokens": 1},
                                                  {"prompt_tokens": 1, "new_tokens": 0}]
    assert t.ids[:, 0].tolist() == [[0, 1], [0, 2], [2, 3], [1, 0]]           # layer 1: physical 4 -> 0
    assert t.ids[:, 1].tolist() == [[2, 0], [3, 2], [3, 3], [2, 1]]           # layer 2: reversed map
    with pytest.raises(TraceError, match="3 layers.*different model"):
        read_sglang_dump(tmp_path / "d.pt", TraceModel(4, 2, (1, 2, 3, 4), 5))


def test_sglang_stat_dump_gives_a_count_only_trace(tmp_path):
    m = TraceModel(4, 2, (1, 2), 3)
    lc = torch.zeros(2, 3, 4, dtype=torch.int32)
    lc[0, 1] = torch.tensor([5, 1, 0, 0])
    lc[1, 1] = torch.tensor([1, 1, 2, 0])
    lc[1, 2] = torch.tensor([0, 0, 0, 9])
    torch.save({"rank": 0, "logical_count": lc}, tmp_path / "s.pt")
    t = read_sglang_dump(tmp_path / "s.pt", m)
    assert not t.has_tokens and t.layer_counts().tolist() == [[6, 2, 2, 0], [0, 0, 0, 9]]
    assert from_logical_count(lc.numpy(), m).layer_counts().tolist() == t.layer_counts().tolist()
    with pytest.raises(TraceError, match=r"expected \[passes, layers, 4\]"):
        from_logical_count(np.zeros((1, 3, 5)), m)


def test_routed_experts_jsonl_lists_and_base64(tmp_path):
    m = TraceModel(4, 2, (1, 2), 3)
    a = np.array([[[0, 0], [1, 2], [3, 0]], [[0, 0], [2, 1], [0, 3]], [[0, 0], [3, 2], [1, 1]]])  # dense row 0
    lines = [json.dumps({"meta_info": {"routed_experts": a.tolist(), "prompt_tokens": 2}}),
             json.dumps({"routed_experts": base64.b64encode(a[:2].astype(np.int32).tobytes()).decode(),
                         "prompt_tokens": 1})]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    t = read_routed_experts(tmp_path / "r.jsonl", m)
    assert t.n_requests == 2 and [r["prompt_tokens"] for r in t.requests()] == [2, 1]
    assert t.ids[:3].tolist() == a[:, 1:].tolist() and t.ids[3:].tolist() == a[:2, 1:].tolist()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(TraceError, match="return_routed_experts"):
        read_routed_experts(tmp_path / "bad.jsonl", m)
