"""The trainer end to end on a small model and a small data folder: a trained checkpoint loads in
hybrid.load with the training model's logits; resume after an interruption; clear errors on bad input."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import hybrid
from hybrid.core.config import ModelConfig
from hybrid.core.weights import dense_tensors, expert_tensors
from train.__main__ import main
from train.checkpoint import STATE_FILE, checkpoints, export, read_model
from train.data import DataConfig
from train.loop import Options, train
from train.model import TrainModel
from train.optim import OptimConfig
from train.recipes import RECIPES
from train.step import Schedule

ROOT = Path(__file__).resolve().parents[2]
SMALL = {k: v for k, v in RECIPES["tiny"].model.items()}
SMALL.update({"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16,
              "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 16,
              "num_experts_per_tok": 2, "max_position_embeddings": 512})
DATA = DataConfig(n_merges=64, chat=20)
SCHED = Schedule(steps=12, batch=4, seq=32, warmup=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("text")
    shutil.copy(ROOT / "hybrid" / "data" / "corpus.txt", d / "corpus.txt")
    for f in ("bpe.py", "chat.py"):
        shutil.copy(ROOT / "hybrid" / "text" / f, d / f)
    return d


def _train(run: Path, data_dir: Path, schedule: Schedule = SCHED, **opts) -> object:
    data = DataConfig(folders=(str(data_dir),), n_merges=DATA.n_merges, chat=DATA.chat)
    return train(run, SMALL, data, OptimConfig(lr=3e-3), schedule,
                 Options(checkpoint_every=opts.pop("checkpoint_every", 5), eval_every=100, eval_batches=2,
                         threads=1, quiet=True, **opts))


def _cli(run: Path, data_dir: Path, *extra: str) -> list[str]:
    cfg = run.parent / "small-config.json"
    cfg.write_text(json.dumps(SMALL))
    return ["--out", str(run), "--config", str(cfg), "--data", str(data_dir), "--merges", "64", "--chat", "20",
            "--steps", "4", "--batch", "2", "--seq", "16", "--threads", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("run") / "r"
    res = _train(run, data_dir, Schedule(steps=30, batch=4, seq=32, warmup=3))
    return res, export(res.checkpoint, run.parent / "model")


def test_parameter_names_are_the_checkpoint_tensor_names():
    cfg = ModelConfig.from_dict({**SMALL, "vocab_size": 576, "bos_token_id": 320, "eos_token_id": 321})
    table = set(dense_tensors(cfg))
    for layer in cfg.moe_layers:
        table |= set(expert_tensors(cfg, layer))
    assert set(TrainModel(cfg).state_dict()) == table


def test_trained_checkpoint_loads_in_hybrid_with_the_training_models_logits(trained):
    res, model_dir = trained
    assert res.finished and res.step == 30
    assert (model_dir / "tiktoken.model").is_file() and not (model_dir / STATE_FILE).exists()
    assert json.loads((model_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    ref_model = read_model(model_dir).eval()                   # the training model holding the saved weights
    ids = torch.randint(0, ref_model.cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(ids[None])[0][0]
    for experts in ("torch", "fp8"):
        eng = hybrid.load(model_dir, device="cpu", experts=experts, threads=1)
        torch.testing.assert_close(eng.forward(ids.tolist()), ref, rtol=0, atol=1e-4)
    # against the float32 weights before block-FP8 / BF16 rounding (measured: 0.03-0.12 in a logit of std 0.9
    # depending on the data the 30 steps saw, next-token distributions under 0.01 apart in total variation)
    live = TrainModel(ref_model.cfg)
    live.load_state_dict(torch.load(res.checkpoint / STATE_FILE, weights_only=True)["model"])
    with torch.no_grad():
        exact = live.eval()(ids[None])[0][0]
    assert (exact - ref).abs().max() < 0.25
    assert 0.5 * (exact.softmax(-1) - ref.softmax(-1)).abs().sum(-1).max() < 0.02


def test_router_bias_is_learned_and_saved(trained):
    res, model_dir = trained
    state = torch.load(res.checkpoint / STATE_FILE, weights_only=True)["model"]
    bias = state["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0                                  # balancing moved it from zero
    from quant.checkpoint import Checkpoint
    with Checkpoint.open(model_dir) as ck:
        assert torch.equal(ck.get("model.layers.1.mlp.gate.e_score_correction_bias"), bias)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, data_dir):
    whole = _train(tmp_path / "whole", data_dir)
    first = _train(tmp_path / "cut", data_dir, stop_after=7)
    assert not first.finished and first.step == 7
    shutil.rmtree(first.checkpoint)           # killed before step 7's checkpoint: resume from step 5
    assert [s for s, _ in checkpoints(tmp_path / "cut")] == [5]
    resumed = _train(tmp_path / "cut", data_dir)
    assert resumed.finished and resumed.step == SCHED.steps
    a = torch.load(whole.checkpoint / STATE_FILE, weights_only=True)
    b = torch.load(resumed.checkpoint / STATE_FILE, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in a["log"]] == [r["loss"] for r in b["log"]]


def test_ctrl_c_saves_the_current_step_and_the_rerun_finishes(tmp_path, data_dir):
    run = tmp_path / "r"
    sched = Schedule(steps=400, batch=2, seq=16, warmup=3)

    def interrupt():
        deadline = time.time() + 120
        while not any(run.glob("checkpoint-*")) and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), 2)                # SIGINT, as Ctrl-C sends it

    threading.Thread(target=interrupt, daemon=True).start()
    first = _train(run, data_dir, sched, checkpoint_every=2)
    assert not first.finished and 2 <= first.step < sched.steps
    assert checkpoints(run)[-1] == (first.step, first.checkpoint)
    second = _train(run, data_dir, sched, checkpoint_every=1000)
    assert second.finished and len(second.log) == sched.steps


def test_empty_data_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blob.bin").write_bytes(b"\0\1\2")
    assert main(["--out", str(tmp_path / "r"), "--data", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "holds no text" in capsys.readouterr().err


@pytest.mark.parametrize("tau", ["0", "-5"])
def test_tau_not_positive_is_refused(tmp_path, data_dir, capsys, tau):
    assert main(_cli(tmp_path / "r", data_dir, "--tau", tau)) == 2
    assert "tau must be > 0" in capsys.readouterr().err


def test_unbuildable_config_is_refused(tmp_path, data_dir, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SMALL, "n_group": 3, "topk_group": 1}))
    assert main(_cli(tmp_path / "r", data_dir, "--config", str(bad))) == 2
    assert "not divisible by n_group" in capsys.readouterr().err
    bad.write_text(json.dumps({**SMALL, "vocab_size": 1000}))
    assert main(_cli(tmp_path / "r2", data_dir, "--config", str(bad))) == 2
    assert "set vocab_size to 576" in capsys.readouterr().err


def test_truncated_checkpoint_is_refused_with_the_fix(tmp_path, data_dir, capsys):
    run = tmp_path / "r"
    assert main(_cli(run, data_dir, "--stop-after", "2")) == 0
    state = checkpoints(run)[-1][1] / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert main(_cli(run, data_dir)) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and "delete" in err


def test_resume_with_other_settings_is_refused(tmp_path, data_dir, capsys):
    run = tmp_path / "r"
    assert main(_cli(run, data_dir, "--stop-after", "1")) == 0
    assert main(_cli(run, data_dir, "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert f"optim.lr was {RECIPES['tiny'].optim.lr}, now 0.01" in err and "new --out" in err


def test_bf16_autocast_defaults_to_what_the_cpu_computes(monkeypatch):
    """A CPU without AVX512-BF16 (Zen 2 here, as Numba's target says) trains in float32 unless told otherwise."""
    monkeypatch.setenv("NUMBA_CPU_NAME", "znver2")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "-avx512f")
    assert Schedule().bf16 is False
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx512f,+avx512bf16")
    assert Schedule().bf16 is True
    assert Schedule(bf16=False).bf16 is False
