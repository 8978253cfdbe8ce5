"""The K2.5-line folder as released (kimi_k25 config, text tensors under `language_model.`, a vision tower):
text runs equal the K2 layout's and transformers' Kimi-K2.5 within 1e-4, and never read the vision tensors."""
import json

import pytest
import torch

import hybrid
from hybrid.models.tiny import K25_VISION, make_tiny
from quant.checkpoint import Checkpoint
from tests.conftest import CONFIGS
from tests.runtime.test_oracle import PROMPT


@pytest.fixture(scope="module")
def k25(tmp_path_factory):
    """(K2.5-layout folder, K2-layout folder) of the same weights (bf16: the oracle compares exact weights)."""
    root = tmp_path_factory.mktemp("k25")
    return (make_tiny(root / "k25", weights="bf16", overrides=CONFIGS["k2"], layout="k25"),
            make_tiny(root / "k2", weights="bf16", overrides=CONFIGS["k2"]))


def test_the_checkpoint_shows_k2_names_and_keeps_the_vision_tower_apart(k25):
    with Checkpoint.open(k25[0]) as a, Checkpoint.open(k25[1]) as b:
        assert a.names == b.names and "lm_head.weight" in a.names
        assert a.vision_names and all(n.startswith(("vision_tower.", "mm_projector.")) for n in a.vision_names)
        assert torch.equal(a.get("model.layers.1.mlp.experts.3.down_proj.weight"),
                           b.get("model.layers.1.mlp.experts.3.down_proj.weight"))


def test_text_runs_equal_the_k2_layout_and_never_read_the_vision_tower(k25, monkeypatch):
    read = []
    real = Checkpoint._read
    monkeypatch.setattr(Checkpoint, "_read", lambda self, name: read.append(name) or real(self, name))
    ours = hybrid.load(k25[0], device="cpu", experts="bf16", prefetch="off")
    assert read and not any(n.startswith(("vision_tower.", "mm_projector.")) for n in read)
    ref = hybrid.load(k25[1], device="cpu", experts="bf16", prefetch="off")
    assert torch.equal(ours.forward(PROMPT), ref.forward(PROMPT))
    assert ours.generate(PROMPT, 8, stop_ids=()) == ref.generate(PROMPT, 8, stop_ids=())


def _transformers_k25(folder, work):
    """transformers' Kimi-K2.5 loaded from the folder as released (its own renaming of `language_model.*` and
    of the vision tower's names), weights in float32."""
    from safetensors.torch import save_file
    from transformers import Kimi_K25ForConditionalGeneration
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["model_type"] = "deepseek_v3"      # transformers' name for the K2 backbone
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(raw))
    with Checkpoint.open(folder) as ck:
        tensors = {"language_model." + n: ck.get(n, torch.float32) for n in ck.names}
        tensors.update({n: ck.get_vision(n).float() for n in ck.vision_names})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "model.safetensors"))
    model = Kimi_K25ForConditionalGeneration.from_pretrained(work, dtype=torch.float32).eval()
    with Checkpoint.open(folder) as ck:
        assert torch.equal(model.lm_head.weight, ck.get("lm_head.weight"))        # the renaming held
    return model


def test_logits_and_greedy_match_transformers_kimi_k25(k25, tmp_path):
    oracle = _transformers_k25(k25[0], tmp_path / "oracle")
    eng = hybrid.load(k25[0], device="cpu", experts="torch")
    with torch.no_grad():
        ref = oracle(torch.tensor([PROMPT])).logits[0].float()
        want = oracle.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(PROMPT):].tolist()
    assert (eng.forward(PROMPT) - ref).abs().max().item() < 1e-4
    assert eng.generate(PROMPT, 8, stop_ids=()) == want


def test_the_tools_accept_the_k25_layout(k25, tmp_path, capsys):
    from hybrid.cli import main
    from quant.cli import main as quant_main
    folder = k25[0]
    assert quant_main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"] > 0 and report["host_expert_bytes"]["int4"] > 0
    assert quant_main(["convert", "--input", str(folder), "--output", str(tmp_path / "store"), "--format", "int4",
                       "--quiet"]) == 0
    capsys.readouterr()
    store = hybrid.load(tmp_path / "store", device="cpu", prefetch="off")
    assert store.generate(PROMPT, 4, stop_ids=()) == \
        hybrid.load(folder, device="cpu", experts="int4", prefetch="off").generate(PROMPT, 4, stop_ids=())
    assert main(["plan", "--config", str(folder), "--gpus", "1xRTX4090", "--cpu", "genoa", "--context", "1k",
                 "--calibration", "/nonexistent/cal.json", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experts_per_layer"] >= 0
