"""ModelConfig: the real configs' spellings, and a clear error for every malformed one."""
import json

import pytest

from hybrid.core.config import ConfigError, ModelConfig
from hybrid.models.tiny import PRESETS

# Kimi K2-Instruct (0711) as shipped, abridged to the fields the runtime reads plus a few it ignores.
K2 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_attention_heads": 64, "num_key_value_heads": 64,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "n_routed_experts": 384, "num_experts_per_tok": 8, "n_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": True, "routed_scaling_factor": 2.827, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 50000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "bos_token_id": 163584, "eos_token_id": 163585, "num_nextn_predict_layers": 0, "aux_loss_alpha": 0.001,
    "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_k2_config_reads_and_derives():
    c = ModelConfig.from_dict(K2)
    assert c.kv_cache_dim == 576 and c.qk_head_dim == 192
    assert c.moe_layers == list(range(1, 61)) and not c.is_moe_layer(0)
    assert c.is_fp8_checkpoint and c.eos_ids == (163585,)
    assert c.rope.factor == 32.0 and c.rope.beta_fast == 1.0


def test_k2_softmax_scale_and_yarn_step():
    from gpu_attn.rope import softmax_scale, yarn_inv_freq
    c = ModelConfig.from_dict(K2)
    assert softmax_scale(c.qk_head_dim, "yarn", c.rope.factor, c.rope.mscale_all_dim) == pytest.approx(0.130861, abs=1e-6)
    f = yarn_inv_freq(64, 50000.0, 32.0, 4096, 1.0, 1.0)
    extra = 1.0 / 50000.0 ** (__import__("torch").arange(0, 64, 2, dtype=__import__("torch").float64) / 64)
    # K2's beta 1/1 gives a hard step: indices 0..19 keep the original frequency, 20..31 are divided by 32
    assert (f[:20] == extra[:20]).all() and ((f[20:] - extra[20:] / 32).abs() < 1e-18).all()


def test_v3_scale():
    from gpu_attn.rope import softmax_scale
    assert softmax_scale(192, "yarn", 40.0, 1.0) == pytest.approx(0.135234, abs=1e-6)


def test_rope_parameters_spelling_and_text_config():
    raw = dict(K2)
    rs = raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, **{k: v for k, v in rs.items() if k != "type"}}
    assert ModelConfig.from_dict(raw).rope == ModelConfig.from_dict(K2).rope
    wrapped = {"model_type": "kimi_k25", "text_config": K2}
    assert ModelConfig.from_dict(wrapped).n_routed_experts == 384


def test_v3_mtp_and_no_q_lora():
    raw = {**K2, "model_type": "deepseek_v3", "num_nextn_predict_layers": 1, "q_lora_rank": None}
    c = ModelConfig.from_dict(raw)
    assert c.q_lora_rank is None and c.num_nextn_predict_layers == 1


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r.pop("kv_lora_rank"), "'kv_lora_rank' is missing"),
    (lambda r: r.update(model_type="llama"), "model_type 'llama' is not supported"),
    (lambda r: r.update(hidden_size="7168"), "'hidden_size' must be int"),
    (lambda r: r.update(norm_topk_prob=1), "'norm_topk_prob' must be bool"),
    (lambda r: r.update(n_group=5), "not divisible by n_group"),
    (lambda r: r.update(num_experts_per_tok=999), "exceeds n_routed_experts"),
    (lambda r: r.update(scoring_func="softmax"), "softmax/noaux_tc is not supported"),
    (lambda r: r.update(qk_rope_head_dim=63), "qk_rope_head_dim must be a positive even"),
    (lambda r: r["rope_scaling"].pop("factor"), "lack 'factor'"),
    (lambda r: r.pop("rope_theta"), "'rope_theta' is missing"),
    (lambda r: r.update(n_routed_expert=r.pop("n_routed_experts")), "found 'n_routed_expert': a misspelling?"),
])
def test_config_errors_name_the_field(mutate, needle):
    raw = json.loads(json.dumps(K2))
    mutate(raw)
    with pytest.raises(ConfigError, match="config.json") as e:
        ModelConfig.from_dict(raw, source="config.json")
    assert needle in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)


def test_unknown_fields_warn_not_fail():
    with pytest.warns(UserWarning, match="shiny_new_field"):
        ModelConfig.from_dict({**K2, "shiny_new_field": 3})


def test_presets_are_valid_and_k2_shaped():
    tiny = ModelConfig.from_dict(PRESETS["tiny"])
    bench = ModelConfig.from_dict(PRESETS["bench"])
    assert tiny.first_k_dense_replace == 1 and tiny.n_shared_experts == 1 and tiny.rope.type == "yarn"
    assert (bench.hidden_size, bench.moe_intermediate_size, bench.num_experts_per_tok) == (7168, 2048, 8)
    routed_fp8 = len(bench.moe_layers) * bench.n_routed_experts * 3 * 7168 * 2048
    assert 3 * 2**30 <= routed_fp8 <= 6 * 2**30
