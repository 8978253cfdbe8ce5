"""The checkpoint's tensor table for a ModelConfig: every name, its shape, and whether the official
release stores it in block FP8. The loader validates against it; make-tiny generates from it.

Names are the checkpoint's (and the torch modules' in hybrid/runtime/model.py). No renames happen anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from hybrid.core.config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    fp8: bool          # stored as float8_e4m3fn + weight_scale_inv in the official release
    dtype: str = "bf16"   # on-disk dtype when not FP8 ("f32" for the router bias)


# The router runs in float32 whatever the compute dtype (as the reference implementations keep it).
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def numel(spec: TensorSpec) -> int:
    n = 1
    for s in spec.shape:
        n *= s
    return n


def device_nbytes(name: str, spec: TensorSpec, dtype_bytes: int) -> int:
    """Bytes of a dense tensor on the device: the compute dtype, except the float32 router."""
    return numel(spec) * (4 if name.endswith(FP32_SUFFIXES) else dtype_bytes)


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """(gate, up, down) weight names of one routed expert."""
    p = f"{layer_prefix(layer)}mlp.experts.{expert}."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


def expert_shapes(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    return (I, H), (I, H), (H, I)


def _mlp(prefix: str, hidden: int, inter: int) -> dict[str, TensorSpec]:
    return {prefix + "gate_proj.weight": TensorSpec((inter, hidden), True),
            prefix + "up_proj.weight": TensorSpec((inter, hidden), True),
            prefix + "down_proj.weight": TensorSpec((hidden, inter), True)}


def dense_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor except the routed experts, in checkpoint order."""
    H, V, nh = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    dq = cfg.qk_head_dim
    out = {"model.embed_tokens.weight": TensorSpec((V, H), False)}
    for L in range(cfg.num_hidden_layers):
        p = layer_prefix(L)
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = TensorSpec((H,), False)
        if cfg.q_lora_rank is None:
            out[a + "q_proj.weight"] = TensorSpec((nh * dq, H), True)
        else:
            out[a + "q_a_proj.weight"] = TensorSpec((cfg.q_lora_rank, H), True)
            out[a + "q_a_layernorm.weight"] = TensorSpec((cfg.q_lora_rank,), False)
            out[a + "q_b_proj.weight"] = TensorSpec((nh * dq, cfg.q_lora_rank), True)
        out[a + "kv_a_proj_with_mqa.weight"] = TensorSpec((cfg.kv_cache_dim, H), True)
        out[a + "kv_a_layernorm.weight"] = TensorSpec((cfg.kv_lora_rank,), False)
        out[a + "kv_b_proj.weight"] = TensorSpec((nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), True)
        out[a + "o_proj.weight"] = TensorSpec((H, nh * cfg.v_head_dim), True)
        out[p + "post_attention_layernorm.weight"] = TensorSpec((H,), False)
        if cfg.is_moe_layer(L):
            out[p + "mlp.gate.weight"] = TensorSpec((cfg.n_routed_experts, H), False)
            out[p + "mlp.gate.e_score_correction_bias"] = TensorSpec((cfg.n_routed_experts,), False, "f32")
            out.update(_mlp(p + "mlp.shared_experts.", H, cfg.moe_intermediate_size * cfg.n_shared_experts))
        else:
            out.update(_mlp(p + "mlp.", H, cfg.intermediate_size))
    out["model.norm.weight"] = TensorSpec((H,), False)
    out["lm_head.weight"] = TensorSpec((V, H), False)
    return out


def expert_tensors(cfg: ModelConfig, layer: int) -> dict[str, TensorSpec]:
    shapes = expert_shapes(cfg)
    return {n: TensorSpec(s, True) for e in range(cfg.n_routed_experts)
            for n, s in zip(expert_names(layer, e), shapes)}


def is_ignored(cfg: ModelConfig, name: str) -> bool:
    """Tensors a checkpoint may carry that plain decoding never uses: the MTP layer(s) past
    num_hidden_layers (DeepSeek-V3 stores them as model.layers.61.*) and rotary caches."""
    if name.startswith("model.layers."):
        layer = name.split(".")[2]
        if layer.isdigit() and int(layer) >= cfg.num_hidden_layers:
            return True
    return name.endswith("rotary_emb.inv_freq")
