"""The resumable training loop behind `python -m train`.

Steps: open the run folder (or check it is the same run) -> data and tokenizer -> model and MuonClip ->
resume from the newest checkpoint if any -> steps, each with its batch a function of (seed, step) ->
checkpoint every N steps and at the end; Ctrl-C or SIGTERM finishes the current step, saves, and exits,
so nothing is lost; a killed run resumes from its last checkpoint and continues exactly as an
uninterrupted run would (same batches, same optimizer state).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybrid.core.config import ConfigError, ModelConfig

from train import checkpoint as ckpt
from train.data import DataConfig, Dataset, build_dataset
from train.model import TrainModel
from train.optim import MuonClip, OptimConfig
from train.step import Schedule, evaluate, train_step


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as run.json, compared on resume."""
    model: dict                 # config.json fields, vocab and special ids filled from the tokenizer
    data: DataConfig
    optim: OptimConfig
    schedule: Schedule

    def identity(self, data_fingerprint: str) -> dict:
        ident = {"model": self.model, "data": dataclasses.asdict(self.data), "optim": dataclasses.asdict(self.optim),
                 "schedule": dataclasses.asdict(self.schedule), "data_fingerprint": data_fingerprint}
        return json.loads(json.dumps(ident))         # as run.json reads back (tuples become lists)


@dataclass(frozen=True)
class Options:
    """How to run it (not part of the run's identity)."""
    checkpoint_every: int = 500
    eval_every: int = 250
    eval_batches: int = 8
    threads: int | None = None
    quiet: bool = False
    stop_after: int | None = None      # stop (with a checkpoint) after this many steps of this call


@dataclass
class Result:
    run: Path
    step: int
    finished: bool
    checkpoint: Path
    heldout_loss: float
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def model_config(raw: dict, data: DataConfig, seq: int) -> dict:
    """The config.json the run trains: raw with the vocab and special ids of the tokenizer `data` trains
    (256 bytes + merges, then the 256 specials, [BOS] first); checked buildable before any data is read."""
    n_ranks = 256 + data.n_merges
    if raw.get("vocab_size", data.vocab_size) != data.vocab_size:
        fix = f" or --merges to {raw['vocab_size'] - 512}" if raw["vocab_size"] > 512 else ""
        raise ConfigError(f"the model config has vocab_size {raw['vocab_size']}, but the tokenizer will have "
                          f"{data.vocab_size} tokens (256 bytes + {data.n_merges} merges + 256 specials); "
                          f"set vocab_size to {data.vocab_size}{fix}")
    out = {**raw, "vocab_size": data.vocab_size, "bos_token_id": n_ranks, "eos_token_id": n_ranks + 1}
    cfg = ModelConfig.from_dict(out, source="the model config")
    if seq > cfg.max_position_embeddings:
        raise ConfigError(f"--seq {seq} exceeds the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings}; use a shorter --seq")
    return out


def train(run: Path, raw_model: dict, data: DataConfig, optim: OptimConfig, schedule: Schedule,
          opts: Options = Options()) -> Result:
    """Train (or resume) the run in folder `run`; returns where it stopped and its held-out loss."""
    run = Path(run)
    t0 = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cfg = RunConfig(model_config(raw_model, data, schedule.seq), data, optim, schedule)
    _clean_partials(run)
    ds = build_dataset(data, run / ckpt.TOKENIZER_DIR, quiet=opts.quiet)
    ckpt.open_run(run, cfg.identity(ds.fingerprint))
    model = TrainModel(ModelConfig.from_dict(cfg.model), schedule.seed)
    opt = MuonClip(model, optim)
    start, log = _resume(run, model, opt, opts.quiet)
    heldout = ds.heldout_batches(opts.eval_batches, schedule.batch, schedule.seq, schedule.seed)
    if not opts.quiet:
        print(_describe(cfg, ds, model, start), flush=True)
    end = schedule.steps if opts.stop_after is None else min(schedule.steps, start + opts.stop_after)
    step = _loop(run, cfg, ds, model, opt, log, heldout, start, end, opts)
    last = ckpt.checkpoints(run)[-1][1] if step == start and start else ckpt.save(run, model, opt, step, cfg.model, log)
    loss = evaluate(model, heldout)
    if not opts.quiet:
        print(f"step {step}/{schedule.steps}: held-out loss {loss:.4f}; checkpoint {last}", flush=True)
    return Result(run, step, step >= schedule.steps, last, loss, log, time.perf_counter() - t0)


def _loop(run, cfg: RunConfig, ds: Dataset, model, opt, log, heldout, start: int, end: int, opts: Options) -> int:
    sch = cfg.schedule
    stop = _StopFlag()
    bar = _progress(start, sch.steps, opts.quiet)
    step, t = start, time.perf_counter()
    with stop:
        while step < end and not stop.raised:
            st = train_step(model, opt, ds.batch(sch.seed, step, sch.batch, sch.seq), step,
                            cfg.optim.lr * sch.lr_scale(step), sch.balance_u, sch.bf16)
            log.append(dataclasses.asdict(st))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{st.loss:.3f}", logit=f"{st.max_logit:.1f}", refresh=False)
            if step % opts.eval_every == 0 and step < end:
                rate = (step - start) / (time.perf_counter() - t)
                log[-1]["heldout_loss"] = evaluate(model, heldout)
                _say(opts.quiet, bar, f"step {step}/{sch.steps} loss {st.loss:.3f} held-out {log[-1]['heldout_loss']:.3f} "
                     f"max logit {st.max_logit:.1f} load max/mean {st.imbalance:.2f} {rate:.2f} steps/s "
                     f"ETA {(sch.steps - step) / rate / 60:.1f} min")
            if step % opts.checkpoint_every == 0 and step < end:
                ckpt.save(run, model, opt, step, cfg.model, log)
    bar.close()
    if stop.raised and not opts.quiet:
        print(f"interrupted: saving step {step}; rerun the same command to resume", file=sys.stderr, flush=True)
    return step


def _resume(run: Path, model: TrainModel, opt: MuonClip, quiet: bool) -> tuple[int, list[dict]]:
    found = ckpt.checkpoints(run)
    if not found:
        return 0, []
    step, folder = found[-1]
    state = ckpt.load_state(folder)
    if state["step"] != step:
        raise ckpt.ResumeError(f"{folder / ckpt.STATE_FILE} says step {state['step']} but the folder is step {step}; "
                               f"delete {folder} to resume from the checkpoint before it, or start a new --out")
    ckpt.restore(state, model, opt, folder)
    if not quiet:
        print(f"resuming from {folder} (step {step})", flush=True)
    return step, list(state["log"])


def _clean_partials(run: Path) -> None:
    """Remove the temporary folders of checkpoint writes an interruption cut short."""
    if run.is_dir():
        for p in run.glob("checkpoint-*.partial-*"):
            shutil.rmtree(p, ignore_errors=True)


def _describe(cfg: RunConfig, ds: Dataset, model: TrainModel, start: int) -> str:
    n = sum(p.numel() for p in model.parameters())
    m = cfg.model
    data = ", ".join(f"{k} {v['train_tokens'] / 1e6:.2f} M tokens (x{v['weight']})" for k, v in ds.stats.items())
    return (f"model: {n / 1e6:.2f} M parameters, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers "
            f"({m['first_k_dense_replace']} dense), {m['n_routed_experts']} experts top-{m['num_experts_per_tok']}, "
            f"vocab {m['vocab_size']}\ndata: {data}\nsteps {start}..{cfg.schedule.steps} of "
            f"{cfg.schedule.batch} x {cfg.schedule.seq} tokens, lr {cfg.optim.lr}, tau {cfg.optim.tau}")


def _say(quiet: bool, bar, msg: str) -> None:
    if quiet:
        return
    if bar.disable:
        print(msg, flush=True)
    else:
        bar.write(msg)


def _progress(start: int, total: int, quiet: bool):
    from hybrid.core.progress import bar
    return bar(total, unit="step", quiet=quiet, initial=start)


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps (a step is never cut in half);
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.raised = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:          # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
