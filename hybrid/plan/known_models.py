"""config.json of the released models the planner knows by name, as shipped (fields the runtime reads).

Kimi K2 (Kimi-K2-Instruct 0711) and DeepSeek-V3 share the DeepSeek-V3 architecture; the values are those of
docs/model.md, "config.json" (the release's own files, cross-checked against third-party copies).
"""
from __future__ import annotations

from pathlib import Path

from hybrid.core.config import ModelConfig

_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
_COMMON = {
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "moe_layer_freq": 1, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": True, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0, "quantization_config": _FP8,
}
CONFIGS = {
    "kimi-k2": {**_COMMON, "model_type": "kimi_k2", "vocab_size": 163840, "first_k_dense_replace": 1,
                "num_attention_heads": 64, "num_key_value_heads": 64, "n_routed_experts": 384, "n_group": 1,
                "topk_group": 1, "routed_scaling_factor": 2.827, "rope_theta": 50000.0,
                "max_position_embeddings": 131072, "bos_token_id": 163584, "eos_token_id": 163585,
                "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "deepseek-v3": {**_COMMON, "model_type": "deepseek_v3", "vocab_size": 129280, "first_k_dense_replace": 3,
                    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
                    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "rope_theta": 10000.0,
                    "max_position_embeddings": 163840, "bos_token_id": 0, "eos_token_id": 1,
                    "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}},
}
NAMES = {"kimi-k2": "Kimi K2", "deepseek-v3": "DeepSeek-V3"}


def resolve_config(spec: str | Path) -> tuple[ModelConfig, str]:
    """A known model name ("kimi-k2", "deepseek-v3") or a model folder -> (config, label)."""
    key = str(spec).lower()
    if key in CONFIGS:
        return ModelConfig.from_dict(CONFIGS[key], source=key), NAMES[key]
    p = Path(spec)
    if p.is_dir() or p.name == "config.json":
        return ModelConfig.from_file(p), str(p)
    raise ValueError(f"unknown model {str(spec)!r}: give one of {', '.join(CONFIGS)} or a model folder with a "
                     f"config.json")
