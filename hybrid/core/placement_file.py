"""placement.json: a static hot set per MoE layer, written by `hybrid profile`, read by `hybrid.load` for
prefetch="static" (and by the planner).

    {"format": "hybrid-placement", "version": 1, "model": {...routing shape, as in traces}, "fraction": f,
     "experts_per_layer": n, "expected_hit_rate": in-sample share of activations it serves, "source": ...,
     "layers": {"<model layer index>": [expert ids, most used first], ...}}
"""
from __future__ import annotations

import json
from pathlib import Path

from hybrid.core.routing import TraceError, TraceModel

PLACEMENT_FORMAT = "hybrid-placement"
PLACEMENT_VERSION = 1


class PlacementError(ValueError):
    """placement.json is missing, malformed, or for a different model."""


def write_placement_file(path: str | Path, model: TraceModel, fraction: float, experts_per_layer: int,
                         expected_hit_rate: float, source: str, layers: dict[int, list[int]]) -> dict:
    """Write placement.json (the module docstring's layout); returns the document written."""
    doc = {"format": PLACEMENT_FORMAT, "version": PLACEMENT_VERSION, "model": model.to_json(),
           "fraction": fraction, "experts_per_layer": experts_per_layer, "expected_hit_rate": expected_hit_rate,
           "source": source, "layers": {str(layer): ids for layer, ids in layers.items()}}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def read_placement(path: str | Path, expect=None) -> dict[int, list[int]]:
    """Read placement.json -> {model layer index: [expert ids]}.

    Args:
        expect: a ModelConfig or TraceModel the placement must have been made for (checked when given).
    Raises PlacementError naming the problem (not JSON, wrong format/version, a layer or expert that the
    model does not have, duplicates), FileNotFoundError if the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"placement file {path} does not exist; make one with `hybrid profile analyze`")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlacementError(f"{path} is not valid JSON ({e}); write it again with `hybrid profile`") from None
    if not isinstance(doc, dict) or doc.get("format") != PLACEMENT_FORMAT:
        raise PlacementError(f"{path}: not a {PLACEMENT_FORMAT} file (a KTransformers logical_count file goes to "
                             f"SGLang's --init-expert-location, not here)")
    if doc.get("version") != PLACEMENT_VERSION:
        raise PlacementError(f"{path}: placement version {doc.get('version')} is not supported (reads "
                             f"{PLACEMENT_VERSION})")
    try:
        model = TraceModel.from_json(doc["model"], str(path))
        layers = {int(k): [int(e) for e in v] for k, v in doc["layers"].items()}
    except (KeyError, TypeError, ValueError, TraceError) as e:
        raise PlacementError(f"{path}: malformed ({e}); write it again with `hybrid profile`") from None
    if expect is not None:
        try:
            model.check(expect if isinstance(expect, TraceModel) else TraceModel.from_config(expect),
                        f"placement {path}")
        except TraceError as e:
            raise PlacementError(str(e)) from None
    for layer, ids in layers.items():
        if layer not in model.moe_layers:
            raise PlacementError(f"{path}: layer {layer} is not a MoE layer of the model ({model.describe()})")
        bad = [e for e in ids if not 0 <= e < model.n_experts]
        if bad or len(set(ids)) != len(ids):
            raise PlacementError(f"{path}: layer {layer} lists {'expert ' + str(bad[0]) if bad else 'an expert twice'}"
                                 f"; ids must be distinct, in 0..{model.n_experts - 1}")
    return layers
