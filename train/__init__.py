"""MuonClip (Muon + QK-Clip) and the training loop that makes the project's shipped small K2 models.

May import hybrid and gpu_attn; nothing imports train. `python -m train --help` for the command.
"""
from train.balance import balance_bias_, imbalance
from train.model import Probe, TrainModel
from train.optim import MuonClip, OptimConfig
from train.qk_clip import qk_clip_

__all__ = ["MuonClip", "OptimConfig", "Probe", "TrainModel", "balance_bias_", "imbalance", "qk_clip_"]
