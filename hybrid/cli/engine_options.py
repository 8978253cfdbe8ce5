"""Engine options shared by `hybrid generate` and `hybrid serve`: one flag per RuntimeOptions field."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from hybrid.core.options import RuntimeOptions


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model folder (default: the bundled tiny model)")
    for f in fields(RuntimeOptions):
        m = f.metadata
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, type=m["type"],
                       choices=m["choices"], help=m["help"], metavar=m["metavar"])


def runtime_options(a: argparse.Namespace) -> RuntimeOptions:
    """The RuntimeOptions the parsed flags name (checked: a bad combination raises ValueError)."""
    return RuntimeOptions(**{f.name: getattr(a, f.name) for f in fields(RuntimeOptions)})


def load_engine(a):
    """hybrid.load with the options add_engine_options defined; the tiny model when --model is absent."""
    from hybrid.models.tiny import ensure_default_tiny
    from hybrid.runtime.loader import load_with
    return load_with(a.model or ensure_default_tiny(), runtime_options(a))
