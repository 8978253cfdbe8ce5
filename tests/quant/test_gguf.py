"""export-gguf: the file re-read with gguf.GGUFReader (names, shapes, metadata, data equal to our
dequantized weights, types per export type), and llama.cpp as a second oracle: its logits on the f32
GGUF against our runtime's (skipped where llama-cpp-python is not installed)."""
from __future__ import annotations

import argparse
import json

import gguf
import numpy as np
import pytest
import torch

import hybrid
from hybrid.text.tokenizer import Tokenizer
from quant.checkpoint import Checkpoint
from quant.errors import CheckpointError
from quant.gguf_export import GGUFExportError, add_export_parser, export_gguf
from quant.gguf_vocab import read_vocab, token_to_string
from quant.writer import write_sharded

PROMPT = [5, 77, 300, 12, 990, 41, 41, 7, 512, 3, 64, 200, 16, 700, 255, 1, 88, 640, 19, 402]
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """exported(kind, type) -> (model dir, gguf path), each made once."""
    cache = {}

    def get(kind="k2", type="f32"):
        if (kind, type) not in cache:
            d = tiny_models(kind, "fp8")
            cache[kind, type] = d, export_gguf(d, tmp_path_factory.mktemp("gguf") / f"{kind}-{type}.gguf", type)
        return cache[kind, type]
    return get


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def _expected(ck: Checkpoint, cfg: hybrid.ModelConfig) -> dict[str, np.ndarray]:
    """GGUF name -> the f32 array llama.cpp must see, built from our own dequantized weights."""
    g = lambda n: ck.get(n, torch.float32).numpy()          # noqa: E731
    out = {"token_embd.weight": g("model.embed_tokens.weight"), "output_norm.weight": g("model.norm.weight"),
           "output.weight": g("lm_head.weight")}
    nh, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    for L in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{L}.", f"blk.{L}."
        a = p + "self_attn."
        out[b + "attn_norm.weight"] = g(p + "input_layernorm.weight")
        out[b + "ffn_norm.weight"] = g(p + "post_attention_layernorm.weight")
        if cfg.q_lora_rank is None:
            out[b + "attn_q.weight"] = g(a + "q_proj.weight")
        else:
            out[b + "attn_q_a.weight"] = g(a + "q_a_proj.weight")
            out[b + "attn_q_a_norm.weight"] = g(a + "q_a_layernorm.weight")
            out[b + "attn_q_b.weight"] = g(a + "q_b_proj.weight")
        out[b + "attn_kv_a_mqa.weight"] = g(a + "kv_a_proj_with_mqa.weight")
        out[b + "attn_kv_a_norm.weight"] = g(a + "kv_a_layernorm.weight")
        kv_b = g(a + "kv_b_proj.weight").reshape(nh, dn + dv, cfg.kv_lora_rank)
        out[b + "attn_k_b.weight"] = kv_b[:, :dn, :].transpose(0, 2, 1)      # [nh, r, dn]
        out[b + "attn_v_b.weight"] = kv_b[:, dn:, :]                         # [nh, dv, r]
        out[b + "attn_output.weight"] = g(a + "o_proj.weight")
        if not cfg.is_moe_layer(L):
            for proj in ("gate", "up", "down"):
                out[f"{b}ffn_{proj}.weight"] = g(f"{p}mlp.{proj}_proj.weight")
            continue
        out[b + "ffn_gate_inp.weight"] = g(p + "mlp.gate.weight")
        out[b + "exp_probs_b.bias"] = g(p + "mlp.gate.e_score_correction_bias")
        for proj in ("gate", "up", "down"):
            out[f"{b}ffn_{proj}_shexp.weight"] = g(f"{p}mlp.shared_experts.{proj}_proj.weight")
            out[f"{b}ffn_{proj}_exps.weight"] = np.stack(
                [g(f"{p}mlp.experts.{e}.{proj}_proj.weight") for e in range(cfg.n_routed_experts)])
    return out


# ---- the file, without llama.cpp ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["k2", "v3", "noqlora"])
def test_f32_tensors_equal_our_dequantized_weights(exported, kind):
    model_dir, path = exported(kind, "f32")
    cfg = hybrid.ModelConfig.from_file(model_dir)
    with Checkpoint.open(model_dir) as ck:
        want = _expected(ck, cfg)
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        t = got[name]
        assert t.tensor_type == Q.F32, name
        assert tuple(int(d) for d in reversed(t.shape)) == w.shape, name     # GGUF lists dims fastest-first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w, err_msg=name)


def test_kv_b_split_matches_per_head_rows(exported):
    # Independent of _expected: head h's K rows are kv_b rows [h*(dn+dv), h*(dn+dv)+dn), stored transposed.
    model_dir, path = exported("k2", "f32")
    cfg = hybrid.ModelConfig.from_file(model_dir)
    with Checkpoint.open(model_dir) as ck:
        kv_b = ck.get("model.layers.1.self_attn.kv_b_proj.weight").numpy()
    t = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    dn, dv = cfg.qk_nope_head_dim, cfg.v_head_dim
    h = cfg.num_attention_heads - 1
    rows = kv_b[h * (dn + dv):(h + 1) * (dn + dv)]
    np.testing.assert_array_equal(t["blk.1.attn_k_b.weight"][h], rows[:dn].T)
    np.testing.assert_array_equal(t["blk.1.attn_v_b.weight"][h], rows[dn:])


@pytest.mark.parametrize("kind", ["k2", "v3", "noqlora"])
def test_metadata_for_llama_cpp_deepseek2(exported, kind):
    model_dir, path = exported(kind, "f32")
    cfg = hybrid.ModelConfig.from_file(model_dir)
    f = _fields(gguf.GGUFReader(path))
    k = lambda key: f["deepseek2." + key]                        # noqa: E731
    assert f["general.architecture"] == "deepseek2"
    assert k("expert_gating_func") == 2                          # sigmoid; absent, llama.cpp uses softmax
    assert k("expert_weights_scale") == pytest.approx(cfg.routed_scaling_factor)
    assert k("expert_weights_norm") is cfg.norm_topk_prob
    assert (k("expert_count"), k("expert_used_count")) == (cfg.n_routed_experts, cfg.num_experts_per_tok)
    assert (k("expert_group_count"), k("expert_group_used_count")) == (cfg.n_group, cfg.topk_group)
    assert k("expert_shared_count") == cfg.n_shared_experts
    assert k("expert_feed_forward_length") == cfg.moe_intermediate_size
    assert k("leading_dense_block_count") == cfg.first_k_dense_replace
    assert k("block_count") == cfg.num_hidden_layers and k("vocab_size") == cfg.vocab_size
    assert k("attention.head_count_kv") == 1
    assert k("attention.q_lora_rank") == (cfg.q_lora_rank or 0)
    assert k("attention.kv_lora_rank") == cfg.kv_lora_rank
    assert k("attention.key_length") == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert k("attention.value_length") == cfg.kv_lora_rank
    assert k("attention.key_length_mla") == cfg.qk_head_dim
    assert k("attention.value_length_mla") == cfg.v_head_dim
    assert k("rope.dimension_count") == cfg.qk_rope_head_dim
    assert k("rope.freq_base") == pytest.approx(cfg.rope.theta)
    assert k("rope.scaling.type") == "yarn"
    assert k("rope.scaling.factor") == pytest.approx(cfg.rope.factor)
    assert k("rope.scaling.original_context_length") == cfg.rope.original_max_position_embeddings
    assert k("rope.scaling.yarn_log_multiplier") == pytest.approx(0.1 * cfg.rope.mscale_all_dim)
    assert (k("rope.scaling.yarn_beta_fast"), k("rope.scaling.yarn_beta_slow")) == (cfg.rope.beta_fast,
                                                                                      cfg.rope.beta_slow)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "kimi-k2"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (cfg.bos_token_id,
                                                                                   cfg.eos_ids[0])


def test_vocab_tokens_types_and_merges(exported):
    model_dir, path = exported("k2", "f32")
    tok = Tokenizer.from_dir(model_dir)
    f = _fields(gguf.GGUFReader(path))
    tokens, types, merges = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.merges"]
    assert len(tokens) == len(types) == tok.vocab_size
    for i in range(tok.n_ranks):                      # ranks: their bytes as GPT-2 strings, NORMAL
        assert tokens[i] == token_to_string(tok.decode_bytes([i])) and types[i] == gguf.TokenType.NORMAL
    assert tokens[tok.im_end_id] == "<|im_end|>" and tokens[tok.eos_id] == "[EOS]"
    assert all(t == gguf.TokenType.CONTROL for t in types[tok.n_ranks:])
    # One merge per multi-byte rank, in rank order; each joins two lower-ranked tokens into that rank.
    rank = {s: i for i, s in enumerate(tokens[:tok.n_ranks])}
    assert len(merges) == tok.n_ranks - 256
    made = []
    for m in merges:
        left, right = m.split(" ")
        assert rank[left] < rank[left + right] and rank[right] < rank[left + right]
        made.append(rank[left + right])
    assert made == sorted(made) == list(range(256, tok.n_ranks))


def test_vocab_holes_past_the_specials_are_unused_pads(tiny_models):
    # vocab_size beyond ranks + 256 specials (K2 has none; the converter's rule): "[PAD{id}]", UNUSED.
    tok = Tokenizer.from_dir(tiny_models("k2", "fp8"))
    vocab = read_vocab(tiny_models("k2", "fp8"), tok.vocab_size + 3)
    assert vocab.tokens[-3:] == [f"[PAD{tok.vocab_size + i}]" for i in range(3)]
    assert vocab.types[-3:] == [gguf.TokenType.UNUSED] * 3
    assert vocab.specials["[PAD]"] == tok.token_id("[PAD]")
    with pytest.raises(ValueError, match="vocab_size 1000"):
        read_vocab(tiny_models("k2", "fp8"), 1000)


@pytest.mark.parametrize("type,weight_type", [("bf16", Q.BF16), ("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)])
def test_quantized_exports_have_the_right_types(exported, type, weight_type):
    model_dir, path = exported("k2", type)
    cfg = hybrid.ModelConfig.from_file(model_dir)
    with Checkpoint.open(model_dir) as ck:
        want = _expected(ck, cfg)
    for t in gguf.GGUFReader(path).tensors:
        keep_f32 = t.name.endswith(("_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias"))
        assert t.tensor_type == (Q.F32 if keep_f32 else weight_type), t.name
        # The data is the weight, within the format's rounding: bf16 8 bits; q8_0 half a step of
        # amax/127; q4_0 a step of amax/8 (the value opposite amax clamps at +7); + the fp16 block scale.
        w = want[t.name]
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        rel = {Q.F32: 0, Q.BF16: 2 ** -8, Q.Q8_0: 1 / 254 + 2 ** -9, Q.Q4_0: 1 / 8 + 2 ** -9}[t.tensor_type]
        blocks = np.abs(w).reshape(-1, 32 if w.shape[-1] % 32 == 0 else 1).max(axis=1, keepdims=True)
        err = np.abs(back - w).reshape(blocks.shape[0], -1)
        assert (err <= rel * blocks + 1e-7).all(), t.name


def test_errors_name_the_problem_and_leave_no_file(tiny_models, tmp_path):
    model_dir = tiny_models("k2", "fp8")
    with pytest.raises(GGUFExportError, match="q5_k"):
        export_gguf(model_dir, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(GGUFExportError, match="does not exist"):
        export_gguf(model_dir, tmp_path / "no" / "x.gguf", "f32")
    with pytest.raises(GGUFExportError, match="not a folder"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf", "f32")
    (tmp_path / "out").mkdir()        # issue 28 item 7: a folder as --output is refused before any work
    reads = []
    with pytest.raises(GGUFExportError, match="is a folder; name the .gguf file"):
        export_gguf(model_dir, tmp_path / "out", "f32", progress=reads.append)
    assert reads == [] and not any((tmp_path / "out").iterdir())
    (tmp_path / "out").rmdir()
    # A config that disagrees with the weights is caught from the headers, before any writing.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    (bad / "config.json").write_text((model_dir / "config.json").read_text().replace('"kimi_k2"', '"llama"'))
    with pytest.raises(GGUFExportError, match="model_type 'llama'"):
        export_gguf(bad, tmp_path / "x.gguf", "f32")
    (bad / "config.json").write_text((model_dir / "config.json").read_text().replace(
        '"moe_intermediate_size": 128', '"moe_intermediate_size": 96'))
    with pytest.raises(CheckpointError, match="config.json implies"):
        export_gguf(bad, tmp_path / "x.gguf", "f32")
    (bad / "tiktoken.model").unlink()
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        export_gguf(bad, tmp_path / "x.gguf", "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_failure_mid_write_leaves_no_file(tiny_models, tmp_path, monkeypatch):
    import quant.gguf_export as ge
    calls = []

    def failing(chunk, qtype):
        calls.append(qtype)
        if len(calls) == 10:
            raise OSError("disk full (simulated)")
        return real(chunk, qtype)
    real = ge._encode
    monkeypatch.setattr(ge, "_encode", failing)
    with pytest.raises(OSError, match="simulated"):
        export_gguf(tiny_models("k2", "fp8"), tmp_path / "x.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_cli_subcommand(tiny_models, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="hybrid-quant")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "m.gguf"
    args = parser.parse_args(["export-gguf", "--input", str(tiny_models("k2", "fp8")), "--output", str(out),
                              "--type", "q8_0", "--quiet"])
    assert args.func(args) == 0
    assert "q8_0" in capsys.readouterr().out
    assert _fields(gguf.GGUFReader(out))["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


# ---- llama.cpp as a second oracle (needs llama-cpp-python) ---------------------------------------
# The deepseek2 loader ignores rope.scaling.yarn_beta_fast/slow (defaults 32/1); our configs say 1/1
# (K2) or 32/1 (V3-like), so the runtime setting is passed from config.json.
def _llama(path, cfg, **kw):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                           yarn_beta_fast=cfg.rope.beta_fast, yarn_beta_slow=cfg.rope.beta_slow,
                           type_k=0, type_v=0, seed=0, verbose=False, **kw)   # f32 KV cache (type 0)


def _llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


@pytest.mark.parametrize("kind", ["k2", "v3", "noqlora"])
def test_llama_cpp_logits_match_ours_at_f32(exported, kind):
    model_dir, path = exported(kind, "f32")
    cfg = hybrid.ModelConfig.from_file(model_dir)
    theirs = _llama_logits(_llama(path, cfg), PROMPT)
    ours = hybrid.load(model_dir, device="cpu", experts="torch").forward(PROMPT).numpy()
    # Both f32 end to end (f32 KV cache too; llama.cpp's default f16 cache alone gives 3e-3); the rest
    # is summation order: measured max |dlogit| 3.2e-6 (k2), 4.7e-6 (v3), 4.5e-6 (noqlora), logits std 1.
    assert np.abs(theirs - ours).max() < 1e-4
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def _checkpoint_from_gguf(path, cfg: hybrid.ModelConfig, model_dir, out_dir):
    """The GGUF's weights, dequantized, as an f32 HF checkpoint (the inverse of the export's table)."""
    data = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
        [int(d) for d in reversed(t.shape)]) for t in gguf.GGUFReader(path).tensors}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate",
             "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj", "attn_q_b": "self_attn.q_b_proj",
             "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
             "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_output": "self_attn.o_proj"}
    nh, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    out = {"model.embed_tokens.weight": data.pop("token_embd.weight"), "model.norm.weight": data.pop(
        "output_norm.weight"), "lm_head.weight": data.pop("output.weight")}
    for name, a in data.items():
        _, L, kind, _ = name.split(".")
        p = f"model.layers.{L}."
        if kind == "attn_k_b":
            v_b = data[f"blk.{L}.attn_v_b.weight"]
            out[p + "self_attn.kv_b_proj.weight"] = np.concatenate([a.transpose(0, 2, 1), v_b], axis=1).reshape(
                nh * (dn + dv), cfg.kv_lora_rank)
        elif kind == "exp_probs_b":
            out[p + "mlp.gate.e_score_correction_bias"] = a
        elif kind.endswith("_exps"):
            for e in range(cfg.n_routed_experts):
                out[f"{p}mlp.experts.{e}.{kind[4:-5]}_proj.weight"] = a[e]
        elif kind.endswith("_shexp"):
            out[f"{p}mlp.shared_experts.{kind[4:-6]}_proj.weight"] = a
        elif kind in ("ffn_gate", "ffn_up", "ffn_down"):
            out[f"{p}mlp.{kind[4:]}_proj.weight"] = a
        elif kind != "attn_v_b":
            out[p + names[kind] + ".weight"] = a
    out_dir.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config))
    write_sharded(out_dir, [(n, torch.tensor(a, dtype=torch.float32)) for n, a in out.items()], 1 << 30)
    return out_dir


def test_llama_cpp_runs_q4_0_export_as_our_model_on_the_same_weights(exported, tmp_path):
    # The benchmark's premise: on the Q4_0 file llama.cpp computes our model with those rounded weights.
    # What remains is llama.cpp's 8-bit activation quantization in Q4_0 matmuls (measured: max |dlogit|
    # 0.09 with logits of std 1, correlation 0.9998, every greedy choice equal). Against the unrounded
    # weights the correlation is only 0.90 on this random model: 4-bit noise, not an export error.
    model_dir, path = exported("k2", "q4_0")
    cfg = hybrid.ModelConfig.from_file(model_dir)
    theirs = _llama_logits(_llama(path, cfg), PROMPT)
    same_weights = _checkpoint_from_gguf(path, cfg, model_dir, tmp_path / "dequantized")
    ours = hybrid.load(same_weights, device="cpu", experts="torch").forward(PROMPT).numpy()
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.995
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9


def test_llama_cpp_tokenizes_like_tiktoken(exported):
    model_dir, path = exported("k2", "f32")
    cfg = hybrid.ModelConfig.from_file(model_dir)
    llm = _llama(path, cfg, vocab_only=True)
    tok = Tokenizer.from_dir(model_dir)
    text = ("The keeper's Notebook: On MONDAY the wind came from the west at 20 knots, 12345 gulls!\n\n"
            "  北京是中国的首都。你好，世界！  tabs\tand  spaces   end")
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
