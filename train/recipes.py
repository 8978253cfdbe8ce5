"""The recipes of the models this project ships: architecture, data, optimizer and schedule in one place.

tiny: the default model of `make run`, `hybrid serve` and `hybrid profile` (hybrid/models/tiny_k2/).
The architecture is make-tiny's "tiny" preset (hidden 256, MLA with q/kv compression, 1 dense + 2 MoE
layers of 16 routed experts top-4 plus a shared expert, noaux_tc routing, YaRN), with the vocabulary of
the tokenizer trained on the run's own data.
"""
from __future__ import annotations

from dataclasses import dataclass

from hybrid.models.tiny import PRESETS

from train.data import DataConfig
from train.optim import OptimConfig
from train.step import Schedule


@dataclass(frozen=True)
class Recipe:
    model: dict
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: Schedule = Schedule()
    notes: str = ""


# The trainer fills these from the tokenizer it trains.
_FROM_TOKENIZER = ("vocab_size", "bos_token_id", "eos_token_id")


def _preset(name: str, **overrides) -> dict:
    return {**{k: v for k, v in PRESETS[name].items() if k not in _FROM_TOKENIZER}, **overrides}


RECIPES = {
    "tiny": Recipe(model=_preset("tiny"), data=DataConfig(n_merges=768),
                   optim=OptimConfig(lr=5e-3, tau=100.0), schedule=Schedule(steps=1200, batch=16, seq=256)),
}
