"""make-tiny: deterministic small checkpoints of the real architecture, in the official release's formats.

Presets:
- tiny:  a K2-shaped model a few MB large (first layer dense, 1 shared expert, sigmoid/noaux_tc routing
         with a non-zero bias, YaRN) for tests; trained (train/recipes.py), it is the shipped default model
         (SHIPPED_TINY);
- bench: K2's own expert shape (hidden 7168, expert width 2048, top-8) with 2 MoE layers x 64 experts,
         5.25 GiB of routed weights in FP8: far beyond the ~64 MiB that acts as cache here, so benchmarks
         measure memory, not cache.
Layouts: "k2" (the K2 / K2-Thinking release: a DeepSeek-V3-style folder) or "k25" (the K2.5 / K2.6 / K2.7
release: a `kimi_k25` config wrapping the text config, text tensors under `language_model.`, and a small
random vision tower under `vision_tower.*` / `mm_projector.*` with the release's tensor names).
Weights are stored block-FP8 (float8_e4m3fn + weight_scale_inv, 128x128 blocks, ragged edges) exactly as
the K2 release stores them, or BF16; shards with an index; tokenizer in K2's format (tiktoken.model +
tokenizer_config.json) trained at make time from a bundled corpus.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from quant.fp8 import quantize_blocks_torch
from quant.writer import write_sharded

from hybrid.text.bpe import tiny_ranks, write_tokenizer
from hybrid.core.config import LAYOUTS, ModelConfig
from hybrid.core.weights import TensorSpec, dense_tensors, expert_tensors

_TINY_RANKS = 768      # 256 bytes + 512 merges; + 256 reserved specials = vocab 1024

_K2_COMMON = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
    "vocab_size": _TINY_RANKS + 256, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.827, "hidden_act": "silu", "rms_norm_eps": 1e-6, "moe_layer_freq": 1,
    "rope_theta": 50000.0, "attention_bias": False, "tie_word_embeddings": False,
    "bos_token_id": _TINY_RANKS, "eos_token_id": _TINY_RANKS + 1, "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
}

PRESETS = {
    "tiny": {
        **_K2_COMMON, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "max_position_embeddings": 8192,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 256,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
    "bench": {
        **_K2_COMMON, "hidden_size": 7168, "intermediate_size": 4096, "moe_intermediate_size": 2048,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 8,
        "num_key_value_heads": 8, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 8,
        "max_position_embeddings": 131072,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
}
_SHARD_BYTES = {"tiny": 1 << 20, "bench": 2 << 30}
# A small MoonViT for the k25 layout: the release's fields, tiny sizes.
K25_VISION = {"model_type": "kimi_k25_vision", "patch_size": 14, "pos_emb_height": 8, "pos_emb_width": 8,
              "pos_emb_time": 2, "num_attention_heads": 2, "num_hidden_layers": 2, "hidden_size": 32,
              "intermediate_size": 64, "hidden_act": "gelu_pytorch_tanh", "merge_kernel_size": [2, 2]}
K25_MEDIA_TOKENS = {"image_token_id": 163605, "video_token_id": 163840, "vision_start_token_id": 163602,
                    "vision_end_token_id": 163604}
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}


def make_tiny(out_dir: str | Path, preset: str = "tiny", seed: int = 0, weights: str = "fp8",
              overrides: dict | None = None, tokenizer: bool = True, quiet: bool = True, layout: str = "k2") -> Path:
    """Write a deterministic random-weight checkpoint to out_dir (created; must not already hold a model).

    Args:
        preset: "tiny" or "bench" (see the module docstring).
        seed: every tensor is drawn from its own generator seeded by (seed, tensor name), so a model is
            identical on every machine and independent of write order.
        weights: "fp8" (block-FP8 like the K2 release) or "bf16".
        overrides: config.json fields to replace (tests build V3-like and no-q-compression variants).
        tokenizer: also write K2-format tokenizer files.
        layout: "k2" or "k25" (see the module docstring).
    Returns: the folder. The folder appears complete only at the end (written beside it, then renamed).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    raw = {**PRESETS[preset], **(overrides or {})}
    cfg = ModelConfig.from_dict(raw, source=f"preset {preset}")
    return write_model(out_dir, raw, lambda name, spec: _init(name, spec, cfg, seed), weights=weights,
                       ranks=tiny_ranks() if tokenizer else None, shard_bytes=_SHARD_BYTES[preset], quiet=quiet,
                       layout=layout, seed=seed)


def write_model(out_dir: str | Path, raw_config: dict, tensor_of: Callable[[str, TensorSpec], torch.Tensor], *,
                weights: str = "fp8", ranks: dict[bytes, int] | None = None, shard_bytes: int = 1 << 20,
                quiet: bool = True, finish: Callable[[Path], None] | None = None, layout: str = "k2",
                seed: int = 0) -> Path:
    """Write a checkpoint in the release layout: config.json, generation_config.json, safetensors shards
    + index (block-FP8 or BF16 as the K2 release stores each tensor), and K2-format tokenizer files.

    Args:
        out_dir: the folder to create; it must not exist or be empty.
        raw_config: config.json's fields (quantization_config is added for weights="fp8").
        tensor_of: (checkpoint name, TensorSpec) -> float tensor of spec.shape, for every name of the
            config's tensor table (hybrid/core/weights.py), called in checkpoint order.
        weights: "fp8" or "bf16".
        ranks: tokenizer ranks to write (hybrid.text.bpe), or None for a folder without tokenizer.
        shard_bytes: shard size limit.
        finish: called with the temporary folder before it is renamed into place, to add files.
        layout: "k2", or "k25": the K2.5 release's wrapper config, `language_model.` names and a random vision
            tower drawn from `seed`.
    Returns: out_dir, which appears complete only at the end (written beside it, then renamed).
    """
    if weights not in ("fp8", "bf16"):
        raise ValueError(f"weights must be 'fp8' or 'bf16', got {weights!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new folder or delete it")
    raw = {**raw_config, **({"quantization_config": FP8_QUANT_CONFIG} if weights == "fp8" else {})}
    cfg = ModelConfig.from_dict(raw, source=f"{out}/config.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))   # private to this call
    (tmp / "config.json").write_text(json.dumps(k25_config(raw) if layout == "k25" else raw, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"]}, indent=2) + "\n")
    tensors = _tensors(cfg, tensor_of, weights, quiet)
    if layout == "k25":
        tensors = _k25_tensors(tensors, K25_VISION, cfg.hidden_size, seed)
    write_sharded(tmp, tensors, shard_bytes)
    if ranks is not None:
        write_tokenizer(tmp, ranks)
    if finish is not None:
        finish(tmp)
    try:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
        # another process finished the same model first (two make-tiny calls into one folder at once)
    return out


def _tensors(cfg: ModelConfig, tensor_of, weights: str, quiet: bool):
    table: dict[str, TensorSpec] = dict(dense_tensors(cfg))
    for layer in cfg.moe_layers:
        table.update(expert_tensors(cfg, layer))
    for i, (name, spec) in enumerate(table.items()):
        w = tensor_of(name, spec)
        if tuple(w.shape) != spec.shape:
            raise ValueError(f"tensor {name!r} has shape {list(w.shape)}, but config.json needs {list(spec.shape)}")
        if not quiet and i % 64 == 0:
            print(f"  {i}/{len(table)} tensors", flush=True)
        if spec.fp8 and weights == "fp8":
            codes, scale_inv = quantize_blocks_torch(w)
            yield name, codes
            yield name + "_scale_inv", scale_inv
        elif spec.dtype == "f32":
            yield name, w.float()
        else:
            yield name, w.to(torch.bfloat16)


def k25_config(text: dict) -> dict:
    """The K2.5 release's config.json around a text config: model_type kimi_k25, the text model in
    text_config, a vision tower in vision_config, the media token ids; embeddings not tied (K2.5 stores
    language_model.lm_head)."""
    return {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25", "text_config": text,
            "vision_config": K25_VISION, "projection_hidden_size": K25_VISION["hidden_size"],
            "projection_layer_norm_eps": 1e-5, "tie_word_embeddings": False, **K25_MEDIA_TOKENS}


def _k25_tensors(text, vision: dict, text_hidden: int, seed: int):
    """The text tensors under `language_model.`, then a random vision tower and projector with the release's
    names (MoonViT blocks: norm0/norm1, fused wqkv, wo, mlp.fc0/fc1; the projector's pre_norm and proj.0/2)."""
    for name, t in text:
        yield "language_model." + name, t
    hv, iv, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    merged = hv * vision["merge_kernel_size"][0] * vision["merge_kernel_size"][1]
    shapes = {"vision_tower.patch_embed.proj.weight": (hv, 3, p, p), "vision_tower.patch_embed.proj.bias": (hv,),
              "vision_tower.patch_embed.pos_emb.weight": (vision["pos_emb_height"], vision["pos_emb_width"], hv)}
    for b in range(vision["num_hidden_layers"]):
        pre = f"vision_tower.encoder.blocks.{b}."
        for part, shape in (("norm0", (hv,)), ("norm1", (hv,)), ("wqkv", (3 * hv, hv)), ("wo", (hv, hv)),
                            ("mlp.fc0", (iv, hv)), ("mlp.fc1", (hv, iv))):
            shapes[pre + part + ".weight"] = shape
            shapes[pre + part + ".bias"] = shape[:1]
    shapes.update({"vision_tower.encoder.final_layernorm.weight": (hv,),
                   "vision_tower.encoder.final_layernorm.bias": (hv,), "mm_projector.pre_norm.weight": (hv,),
                   "mm_projector.pre_norm.bias": (hv,), "mm_projector.proj.0.weight": (merged, merged),
                   "mm_projector.proj.0.bias": (merged,), "mm_projector.proj.2.weight": (text_hidden, merged),
                   "mm_projector.proj.2.bias": (text_hidden,)})
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + seed)
        yield name, (torch.randn(shape, generator=g) / max(shape[-1], 1) ** 0.5).to(torch.bfloat16)


def _init(name: str, spec: TensorSpec, cfg: ModelConfig, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + seed)
    if name.endswith("e_score_correction_bias"):
        # Non-zero so the "bias only chooses, never weighs" rule is exercised.
        return (torch.rand(spec.shape, generator=g) - 0.5) * 0.2
    if len(spec.shape) == 1:     # norm weights near 1
        return 1.0 + 0.1 * torch.randn(spec.shape, generator=g)
    if name == "model.embed_tokens.weight":
        return torch.randn(spec.shape, generator=g)
    # Linear layers: std 1/sqrt(fan_in) keeps activations O(1) and spreads router logits (std ~1), so
    # top-k choices are rarely near-ties.
    return torch.randn(spec.shape, generator=g) / spec.shape[1] ** 0.5


# The default model of `hybrid generate`, `hybrid serve` and `hybrid profile`: the tiny preset trained with
# MuonClip by `python -m train --recipe tiny` (train/recipes.py; README "Training"), committed as package
# data so that a first run neither trains nor downloads anything.
SHIPPED_TINY = Path(__file__).resolve().parent / "tiny_k2"


def default_tiny_dir() -> Path:
    """The folder of the shipped trained tiny model."""
    return SHIPPED_TINY


def ensure_default_tiny() -> Path:
    """The shipped tiny model's folder; FileNotFoundError with the fix when the install lacks it."""
    d = default_tiny_dir()
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"the shipped tiny model is missing from {d}; reinstall the package "
                                "(pip install -e .), or pass --model DIR (`hybrid make-tiny --out DIR` "
                                "writes a random-weight one)")
    return d
