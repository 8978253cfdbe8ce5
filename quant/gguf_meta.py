"""The metadata half of export-gguf: config.json read and checked for llama.cpp's deepseek2, and the
GGUF key/value pairs written from it (names as llama.cpp's convert_hf_to_gguf.py writes them).

config.json is read here as a plain dict: quant/ does not import hybrid/ (docs/architecture.md), and the export
needs only a dozen fields, read with the checkpoint's own names.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import gguf

from quant.gguf_vocab import GGUFVocab


class GGUFExportError(ValueError):
    """The input folder cannot be exported as a deepseek2 GGUF; the message says why and what to do."""


# ---- config ------------------------------------------------------------------------------------
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "first_k_dense_replace", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
             "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
             "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps", "max_position_embeddings")


def read_config(model_dir: Path) -> dict:
    """config.json as a plain dict (K2.5 `text_config` unwrapped), checked for what deepseek2 can run.

    Adds `rope` = {"theta", "type", and for yarn "factor", "original_max_position_embeddings",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}, read from `rope_scaling` or `rope_parameters`.
    """
    from quant.convert import read_config_dict
    path = model_dir / "config.json"
    cfg = read_config_dict(model_dir, GGUFExportError)
    if cfg.get("model_type") not in ("kimi_k2", "deepseek_v3"):
        raise GGUFExportError(f"{path}: model_type {cfg.get('model_type')!r} is not exportable; "
                              "export-gguf handles kimi_k2 and deepseek_v3 checkpoints")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise GGUFExportError(f"{path}: required fields {missing} are missing; copy config.json unchanged "
                              "from the checkpoint")
    cfg = {"q_lora_rank": None, "n_group": 1, "topk_group": 1, "moe_layer_freq": 1,
           "scoring_func": "sigmoid", "tie_word_embeddings": False, **cfg}
    for key, want in (("scoring_func", "sigmoid"), ("moe_layer_freq", 1), ("tie_word_embeddings", False)):
        if cfg[key] != want:
            raise GGUFExportError(f"{path}: {key} = {cfg[key]!r}; llama.cpp's deepseek2 layout needs {want!r}")
    if cfg["n_shared_experts"] < 1:
        raise GGUFExportError(f"{path}: n_shared_experts = {cfg['n_shared_experts']}; llama.cpp's deepseek2 "
                              "loader requires the shared expert tensors")
    cfg["rope"] = _read_rope(cfg, path)
    return cfg


def _read_rope(cfg: dict, path: Path) -> dict:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rs.get("rope_theta"))
    if theta is None:
        raise GGUFExportError(f"{path}: rope_theta is missing (neither top-level nor in rope_parameters)")
    kind = rs.get("type", rs.get("rope_type", "default"))
    if kind == "default":
        return {"type": "none", "theta": float(theta)}
    if kind != "yarn" or "factor" not in rs or "original_max_position_embeddings" not in rs:
        raise GGUFExportError(f"{path}: rope scaling {rs!r} is not exportable; K2 and V3 use yarn with "
                              "factor and original_max_position_embeddings")
    rope = {"type": "yarn", "theta": float(theta), "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
            "beta_fast": float(rs.get("beta_fast", 32.0)), "beta_slow": float(rs.get("beta_slow", 1.0)),
            "mscale": float(rs.get("mscale", 1.0)), "mscale_all_dim": float(rs.get("mscale_all_dim", 0.0))}
    if rope["mscale"] not in (1.0, rope["mscale_all_dim"]):
        # llama.cpp takes mscale = 1, or = mscale_all_dim when that is not 1 (llama-context.cpp).
        warnings.warn(f"{path}: yarn mscale {rope['mscale']} differs from 1 and from mscale_all_dim "
                      f"{rope['mscale_all_dim']}; llama.cpp will scale rotary cos/sin differently", stacklevel=3)
    return rope


# ---- metadata ----------------------------------------------------------------------------------
def write_metadata(w: gguf.GGUFWriter, cfg: dict, vocab: GGUFVocab, file_type: gguf.LlamaFileType, name: str) -> None:
    """All key/value pairs llama.cpp's deepseek2 loader and vocab reader use (docs/formats.md, "Output: GGUF")."""
    rope = cfg["rope"]
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(1)                                      # MLA runs as MQA over the compressed cache
    w.add_rope_freq_base(rope["theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_group_count(cfg["n_group"])
    w.add_expert_group_used_count(cfg["topk_group"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)  # absent, llama.cpp assumes softmax (V2)
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_vocab_size(cfg["vocab_size"])
    # q_lora_rank 0 makes the loader take a plain attn_q (the converter omits the key, which only
    # "lite" layer counts tolerate).
    w.add_q_lora_rank(cfg["q_lora_rank"] or 0)
    w.add_kv_lora_rank(cfg["kv_lora_rank"])
    w.add_key_length(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
    w.add_value_length(cfg["kv_lora_rank"])
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))
    w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
    if rope["type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])   # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]
    else:
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("kimi-k2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            add(value)
    if "[PAD]" in vocab.specials:
        w.add_pad_token_id(vocab.specials["[PAD]"])
    w.add_add_bos_token(False)                                  # K2's encode and template add no [BOS]
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
