"""The test oracle: transformers' DeepSeek-V3 implementation loaded with exactly our checkpoint's weights
(dequantized to float32), so any disagreement is ours, not the quantization's."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from quant.checkpoint import Checkpoint


def oracle_model(model_dir: Path, work_dir: Path):
    from transformers import DeepseekV3ForCausalLM
    raw = json.loads((model_dir / "config.json").read_text())
    raw["model_type"] = "deepseek_v3"          # transformers rejects "kimi_k2" (K2's deploy guide says rename)
    raw.pop("quantization_config", None)
    raw["torch_dtype"] = "float32"
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.json").write_text(json.dumps(raw))
    with Checkpoint.open(model_dir) as ck:
        save_file({n: ck.get(n, torch.float32).contiguous() for n in ck.names}, str(work_dir / "model.safetensors"))
    model = DeepseekV3ForCausalLM.from_pretrained(work_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def oracle_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def oracle_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, use_cache=True)
    return out[0, len(ids):].tolist()
