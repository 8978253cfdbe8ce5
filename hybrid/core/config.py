"""ModelConfig: the checkpoint's config.json, read field by field with the checkpoint's own names.

Accepts `model_type` "kimi_k2" (Kimi K2, K2-0905, K2-Thinking) and "deepseek_v3" (DeepSeek-V3/R1), a
K2.5-style `text_config` wrapper, `q_lora_rank: null`, and rope settings spelled `rope_scaling` (HF
checkpoints) or `rope_parameters` (transformers 5 saves, with `rope_theta` inside). The MTP layer
(`num_nextn_predict_layers`) is ignored: plain decoding never runs it.
"""
from __future__ import annotations

import difflib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
# Folder layouts of the releases: "k2" (K2, K2-Thinking: DeepSeek-V3 style) and "k25" (K2.5 / K2.6 / K2.7: a
# kimi_k25 config around the text config, text tensors under `language_model.`, a vision tower beside them).
LAYOUTS = ("k2", "k25")


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes a model this runtime cannot run."""


# (field, type) pairs that must be present. bool is checked before int (bool is an int in Python).
_REQUIRED = {
    "vocab_size": int, "hidden_size": int, "intermediate_size": int, "moe_intermediate_size": int,
    "num_hidden_layers": int, "first_k_dense_replace": int, "num_attention_heads": int,
    "kv_lora_rank": int, "qk_nope_head_dim": int, "qk_rope_head_dim": int, "v_head_dim": int,
    "n_routed_experts": int, "num_experts_per_tok": int, "n_shared_experts": int, "n_group": int,
    "topk_group": int, "norm_topk_prob": bool, "routed_scaling_factor": float, "rms_norm_eps": float,
    "max_position_embeddings": int,
}
# Optional fields and their defaults (DeepSeek-V3's own defaults).
_OPTIONAL = {
    "q_lora_rank": None, "moe_layer_freq": 1, "hidden_act": "silu", "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
    "num_nextn_predict_layers": 0, "attention_bias": False, "quantization_config": None,
}
# Present in real configs, irrelevant to inference here.
_IGNORED = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "initializer_range", "pretraining_tp", "use_cache", "attention_dropout", "aux_loss_alpha",
    "seq_aux", "num_key_value_heads", "ep_size", "rope_scaling", "rope_parameters", "rope_theta",
    "rope_interleave", "num_mtp_layers", "pad_token_id", "output_router_logits", "router_aux_loss_coef",
    "_name_or_path", "text_config", "head_dim", "qk_head_dim", "generation_config", "mlp_layer_types",
}


@dataclass(frozen=True)
class RopeConfig:
    """YaRN (or plain) rotary settings. `factor` 1.0 with type "default" means plain RoPE."""
    type: str
    theta: float
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    q_lora_rank: int | None = None
    moe_layer_freq: int = 1
    hidden_act: str = "silu"
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    num_nextn_predict_layers: int = 0
    attention_bias: bool = False
    quantization_config: dict | None = field(default=None, compare=False, hash=False)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: normed c_kv plus roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    @property
    def is_fp8_checkpoint(self) -> bool:
        q = self.quantization_config or {}
        return q.get("quant_method") == "fp8"

    # ---- reading -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: a model folder needs the checkpoint's config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); restore the file from the checkpoint") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if isinstance(raw.get("text_config"), dict):   # K2.5 / K2.6: the text backbone is nested
            raw = raw["text_config"]
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; this runtime runs "
                f"{' and '.join(SUPPORTED_MODEL_TYPES)} checkpoints (Kimi K2, DeepSeek-V3/R1)")
        values = {"model_type": model_type}
        unknown = [k for k in raw if k not in _REQUIRED and k not in _OPTIONAL and k not in _IGNORED]
        for name, typ in _REQUIRED.items():
            if name not in raw:
                hint = difflib.get_close_matches(name, unknown, n=1)
                did = f" (found {hint[0]!r}: a misspelling?)" if hint else ""
                raise ConfigError(f"{source}: required field {name!r} is missing{did}; "
                                  f"copy config.json unchanged from the checkpoint")
            values[name] = _typed(raw[name], typ, name, source)
        for name, default in _OPTIONAL.items():
            values[name] = raw.get(name, default)
        if unknown:
            warnings.warn(f"{source}: ignoring fields this runtime does not use: {', '.join(sorted(unknown))}",
                          stacklevel=2)
        if values["q_lora_rank"] is not None:
            values["q_lora_rank"] = _typed(values["q_lora_rank"], int, "q_lora_rank", source)
        if isinstance(values["eos_token_id"], list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        values["rope"] = _read_rope(raw, source)
        cfg = cls(**values)
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        def bad(msg):
            raise ConfigError(f"{source}: {msg}")
        for name in ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "max_position_embeddings", "n_group", "topk_group",
                     "moe_layer_freq"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be a positive even number (rotary pairs), got {self.qk_rope_head_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})")
        if self.n_routed_experts % self.n_group:
            bad(f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            bad(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            bad("group-limited routing needs at least 2 experts per group")
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            bad(f"routing {self.scoring_func}/{self.topk_method} is not supported; K2 and V3 use sigmoid/noaux_tc")
        if self.hidden_act != "silu":
            bad(f"hidden_act {self.hidden_act!r} is not supported; K2 and V3 use 'silu'")
        if self.attention_bias:
            bad("attention_bias true is not supported; K2 and V3 have no attention biases")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings true is not supported; K2 and V3 have an untied lm_head")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad(f"first_k_dense_replace ({self.first_k_dense_replace}) must lie in 0..num_hidden_layers")


def _typed(value, typ, name, source):
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:  # float: ints are fine
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    if not ok:
        raise ConfigError(f"{source}: field {name!r} must be {typ.__name__}, got {value!r}")
    return value


def _read_rope(raw: dict, source: str) -> RopeConfig:
    """rope_scaling (HF checkpoints) or rope_parameters (transformers 5); rope_theta top-level or inside."""
    rs = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        raise ConfigError(f"{source}: rope_scaling / rope_parameters must be an object, got {rs!r}")
    theta = raw.get("rope_theta", rs.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{source}: required field 'rope_theta' is missing (neither top-level nor in "
                          f"rope_parameters)")
    kind = rs.get("type", rs.get("rope_type", "default"))
    if kind == "default":
        return RopeConfig(type="default", theta=_typed(theta, float, "rope_theta", source))
    if kind != "yarn":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported; K2 and V3 use 'yarn'")
    try:
        rope = RopeConfig(
            type="yarn", theta=_typed(theta, float, "rope_theta", source),
            factor=_typed(rs["factor"], float, "rope_scaling.factor", source),
            original_max_position_embeddings=_typed(rs["original_max_position_embeddings"], int,
                                                    "rope_scaling.original_max_position_embeddings", source),
            beta_fast=_typed(rs.get("beta_fast", 32.0), float, "rope_scaling.beta_fast", source),
            beta_slow=_typed(rs.get("beta_slow", 1.0), float, "rope_scaling.beta_slow", source),
            mscale=_typed(rs.get("mscale", 1.0), float, "rope_scaling.mscale", source),
            mscale_all_dim=_typed(rs.get("mscale_all_dim", 0.0), float, "rope_scaling.mscale_all_dim", source))
    except KeyError as e:
        raise ConfigError(f"{source}: yarn rope settings lack {e.args[0]!r}") from None
    if not math.isfinite(rope.factor) or rope.factor <= 0:
        raise ConfigError(f"{source}: rope factor must be positive, got {rope.factor}")
    return rope
