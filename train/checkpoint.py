"""A training run's folder: its identity, its tokenizer, and resumable checkpoints in the release layout.

    RUN/run.json                  what the run is (model config, data, optimizer, schedule, data fingerprint)
    RUN/tokenizer/                tiktoken.model + tokenizer_config.json, trained once at the run's start
    RUN/checkpoint-000500/        config.json, generation_config.json, shards + index (block FP8),
                                  tokenizer files: loads in hybrid.load as it is;
                                  train_state.pt: float32 weights, router biases, optimizer state, step,
                                  the step log: what a resume needs (FP8 weights alone would lose precision)

A checkpoint folder appears whole or not at all (written beside it, then renamed; train_state.pt is
added before the rename); the two newest are kept. A resume takes the newest, after checking that the
run folder describes the same run as the command and that train_state.pt reads back complete.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from hybrid.core.config import ModelConfig
from hybrid.models.tiny import write_model
from quant.checkpoint import Checkpoint
from hybrid.text.tokenizer import RANKS_FILE, read_ranks

from train.model import TrainModel
from train.optim import MuonClip

RUN_FILE = "run.json"
STATE_FILE = "train_state.pt"
TOKENIZER_DIR = "tokenizer"
KEEP = 2
_CKPT = re.compile(r"^checkpoint-(\d{6,})$")


class ResumeError(ValueError):
    """A run folder or checkpoint cannot be resumed (different run, truncated or corrupt files)."""


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / f"checkpoint-{step:06d}"


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete-looking checkpoint in run, oldest first."""
    out = [(int(m.group(1)), p) for p in run.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return sorted(out)


def open_run(run: Path, identity: dict) -> None:
    """Create run/run.json, or check that an existing one describes the same run.

    Raises ResumeError naming every field that differs."""
    path = run / RUN_FILE
    if not path.exists():
        run.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(identity, indent=2) + "\n")
        tmp.replace(path)
        return
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResumeError(f"{path} is not valid JSON ({e}); the run folder is damaged: start a new --out") from None
    diffs = _diff(saved, identity)
    if diffs:
        raise ResumeError(f"{run} holds a different training run, so it cannot be resumed with these settings: "
                          + "; ".join(diffs) + ". Rerun with the run's own settings to resume it, or choose a new --out")


def _diff(saved, now, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now)) for d in _diff(saved.get(k), now.get(k), f"{where}{k}.")]
    return [] if saved == now else [f"{where.rstrip('.')} was {saved!r}, now {now!r}"]


def save(run: Path, model: TrainModel, opt: MuonClip, step: int, raw_config: dict, log: list[dict]) -> Path:
    """Write checkpoint-{step} (release layout + train_state.pt) and drop all but the KEEP newest."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ranks = read_ranks(run / TOKENIZER_DIR / RANKS_FILE)

    def add_state(folder: Path) -> None:
        torch.save({"step": step, "model": state, "optim": opt.state_dict(), "log": log}, folder / STATE_FILE)

    out = checkpoint_dir(run, step)
    if out.exists():                       # a rerun of a step already saved (resumed from an older one)
        shutil.rmtree(out)
    write_model(out, raw_config, lambda name, spec: state[name], weights="fp8", ranks=ranks, finish=add_state)
    for _, old in checkpoints(run)[:-KEEP]:
        shutil.rmtree(old)
    return out


def load_state(folder: Path) -> dict:
    """train_state.pt of a checkpoint; ResumeError when missing, truncated or corrupt."""
    path = folder / STATE_FILE
    fix = (f"delete {folder} to resume from the checkpoint before it (if any), or start a new --out")
    if not path.is_file():
        raise ResumeError(f"{path} is missing, so {folder} cannot be resumed; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ResumeError(f"{path} cannot be read ({str(e).splitlines()[0]}): it is truncated or corrupt; {fix}") from None
    if not isinstance(state, dict) or not {"step", "model", "optim", "log"} <= set(state):
        raise ResumeError(f"{path} is not a train_state written by this trainer; {fix}")
    return state


def restore(state: dict, model: TrainModel, opt: MuonClip, folder: Path) -> None:
    """Load a train_state into model and optimizer; ResumeError when its tensors do not fit the model."""
    try:
        model.load_state_dict(state["model"], strict=True)
        opt.load_state_dict(state["optim"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ResumeError(f"{folder / STATE_FILE} does not fit the model this run builds ({str(e).splitlines()[0]}); "
                          "the checkpoint belongs to another configuration: start a new --out") from None


def export(folder: Path, dest: Path) -> Path:
    """Copy a checkpoint's release files (everything but train_state.pt) to dest (created, must be empty)."""
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} already exists and is not empty; choose a new folder or delete it")
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        if f.name != STATE_FILE:
            shutil.copy2(f, dest / f.name)
    return dest


def read_model(model_dir: Path) -> TrainModel:
    """A TrainModel holding a release-layout checkpoint's weights as hybrid.load reads them (block FP8
    dequantized, BF16 widened to float32): the training model of exactly the shipped weights."""
    cfg = ModelConfig.from_file(model_dir)
    model = TrainModel(cfg)
    with Checkpoint.open(model_dir) as ck, torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(ck.get(name, dtype=torch.float32, expect_shape=tuple(t.shape)))
    return model
