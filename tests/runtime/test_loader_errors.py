"""Bad model folders give one clear error naming the file and tensor; the CLI prints it without a traceback."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybrid
from hybrid.core.config import ConfigError
from quant.errors import CheckpointError


@pytest.fixture
def model(tiny_models, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_models("k2", "fp8"), d)
    return d


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def _rewrite_shard(d, name, edit):
    """Apply edit(tensors) to the shard holding `name`, keeping the index consistent."""
    idx = _index(d)
    shard = d / idx["weight_map"][name]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != shard.name}
    idx["weight_map"].update({k: shard.name for k in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_missing_shard(model):
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        hybrid.load(model, device="cpu", experts="torch")


def test_truncated_shard(model):
    shard = sorted(model.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        hybrid.load(model, device="cpu", experts="torch")
    assert shard.name in str(e.value)


def test_corrupt_header(model):
    shard = sorted(model.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        hybrid.load(model, device="cpu", experts="torch")


def test_tensor_missing_everywhere(model):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite_shard(model, name, lambda t: (t.pop(name), t.pop(name + "_scale_inv")))
    with pytest.raises(CheckpointError, match="experts.3.up_proj.weight' is missing"):
        hybrid.load(model, device="cpu", experts="torch")


def test_index_names_tensor_not_in_shard(model):
    idx = _index(model)
    idx["weight_map"]["model.layers.0.mlp.extra.weight"] = next(iter(idx["weight_map"].values()))
    (model / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="mlp.extra.weight"):
        hybrid.load(model, device="cpu", experts="torch")


def test_unexpected_tensor(model):
    name = "model.norm.weight"
    _rewrite_shard(model, name, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match="mystery.weight' is not part of the model"):
        hybrid.load(model, device="cpu", experts="torch")


def test_mtp_layer_is_ignored(model):
    _rewrite_shard(model, "model.norm.weight", lambda t: t.update({"model.layers.3.enorm.weight": torch.ones(256)}))
    assert hybrid.load(model, device="cpu", experts="torch").forward([1, 2]).shape == (2, 1024)


def test_config_disagrees_with_weights(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["moe_intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        hybrid.load(model, device="cpu", experts="torch")
    msg = str(e.value)
    assert "model.layers.1.mlp.shared_experts" in msg and "config.json" in msg and ".safetensors" in msg


def test_bad_config(model):
    cfg = json.loads((model / "config.json").read_text())
    del cfg["num_experts_per_tok"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        hybrid.load(model, device="cpu", experts="torch")


def test_cli_error_is_a_message_not_a_traceback(model):
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    r = subprocess.run([sys.executable, "-m", "hybrid", "generate", "--model", str(model), "--prompt-ids", "1,2"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "hybrid: error:" in r.stderr and shard.name in r.stderr and "Traceback" not in r.stderr


def test_nan_expert_scales_stop_generation_and_point_at_verify(model, capsys):
    """Issue 28 item 5: NaN in the weights (here every expert scale of layer 1) used to generate token 0 over
    and over with exit 0; the first non-finite logits stop the run with a message naming the check."""
    from hybrid.cli import main
    from hybrid.core.errors import NonFiniteOutput
    name = "model.layers.1.mlp.experts.0.down_proj.weight"

    def poison(tensors):
        for k in tensors:
            if k.startswith("model.layers.1.mlp.experts.") and k.endswith("_scale_inv"):
                tensors[k] = torch.full_like(tensors[k], float("nan"))
    _rewrite_shard(model, name, poison)
    eng = hybrid.load(model, device="cpu", prefetch="off")
    with pytest.raises(NonFiniteOutput, match="hybrid-quant verify"):
        eng.generate([1, 2, 3], 4, stop_ids=())
    assert main(["generate", "--model", str(model), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "non-finite logits" in err and "Traceback" not in err
