"""`python -m train`: train (or resume) a small K2-architecture model with MuonClip.

    python -m train --out RUN [--recipe tiny] [--config config.json] [--data FOLDER ...] [--steps N]
                    [--batch B] [--seq T] [--lr LR] [--tau TAU | --no-qk-clip] [--merges N] [--seed N]
                    [--checkpoint-every N] [--eval-every N] [--threads N] [--export DIR] [--quiet]

Rerunning the same command resumes from RUN's newest checkpoint. --export copies the final model (release
layout, no training state) to DIR, e.g. hybrid/models/tiny_k2 for the shipped default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from hybrid.core.config import ConfigError

from train.checkpoint import ResumeError, export
from train.corpus import DataError
from train.loop import Options, train
from train.recipes import RECIPES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (created; resumed when it holds a run)")
    p.add_argument("--recipe", default="tiny", choices=sorted(RECIPES))
    p.add_argument("--config", type=Path, help="config.json of the model to train instead of the recipe's")
    p.add_argument("--data", type=Path, action="append",
                   help="folder of text files (.py .txt .md .rst) instead of the standard library + bundled corpus; repeatable")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--lr", type=float)
    clip = p.add_mutually_exclusive_group()
    clip.add_argument("--tau", type=float, help="QK-Clip threshold (K2: 100)")
    clip.add_argument("--no-qk-clip", action="store_true", help="plain Muon, no QK-Clip")
    p.add_argument("--float32", action="store_true", help="no bf16 autocast (for CPUs without bf16 support)")
    p.add_argument("--merges", type=int, help="BPE merges of the tokenizer trained at the start")
    p.add_argument("--chat", type=int, help="chat-template conversations in the mixture")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--stop-after", type=int, help="stop after this many steps of this call (resumable)")
    p.add_argument("--export", type=Path, help="copy the final model (release files only) to this folder")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def settings(a):
    """The recipe with the command line's overrides: (model dict, DataConfig, OptimConfig, Schedule)."""
    r = RECIPES[a.recipe]
    model = r.model
    if a.config is not None:
        try:
            model = json.loads(a.config.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{a.config} cannot be read as a config.json ({e}); pass a model's config.json") from None
    data = _replace(r.data, folders=tuple(str(f) for f in a.data) if a.data else None, n_merges=a.merges,
                    chat=a.chat, seed=a.seed)
    optim = _replace(r.optim, lr=a.lr, tau=a.tau)
    if a.no_qk_clip:
        optim = dataclasses.replace(optim, tau=None)
    schedule = _replace(r.schedule, steps=a.steps, batch=a.batch, seq=a.seq, seed=a.seed,
                        bf16=False if a.float32 else None)
    return model, data, optim, schedule


def _replace(obj, **kw):
    return dataclasses.replace(obj, **{k: v for k, v in kw.items() if v is not None})


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        for name in ("checkpoint_every", "eval_every"):
            if getattr(a, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
        model, data, optim, schedule = settings(a)
        res = train(a.out, model, data, optim, schedule,
                    Options(a.checkpoint_every, a.eval_every, threads=a.threads, quiet=a.quiet, stop_after=a.stop_after))
        if a.export is not None and res.finished:
            export(res.checkpoint, a.export)
            if not a.quiet:
                print(f"exported {res.checkpoint} to {a.export}")
    except (ConfigError, DataError, ResumeError, ValueError, FileExistsError, FloatingPointError) as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
