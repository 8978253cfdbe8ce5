"""The routing shape shared by traces, placements and the runtime: how many experts, top-k, which layers.

A routing trace (hybrid/profile/trace.py), a placement.json (hybrid/core/placement_file.py) and a loaded model
must agree on it; TraceModel.check() says where they do not.
"""
from __future__ import annotations

from dataclasses import dataclass


class TraceError(ValueError):
    """A trace file or routing dump is malformed, truncated, or from a different model."""


@dataclass(frozen=True)
class TraceModel:
    """The routing shape a trace belongs to (what a replay or a placement must agree with)."""
    n_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    num_hidden_layers: int
    model_type: str = "kimi_k2"

    @classmethod
    def from_config(cls, cfg) -> "TraceModel":
        return cls(cfg.n_routed_experts, cfg.num_experts_per_tok, tuple(cfg.moe_layers), cfg.num_hidden_layers,
                   cfg.model_type)

    def to_json(self) -> dict:
        return {"model_type": self.model_type, "n_routed_experts": self.n_experts,
                "num_experts_per_tok": self.top_k, "num_hidden_layers": self.num_hidden_layers,
                "moe_layers": list(self.moe_layers)}

    @classmethod
    def from_json(cls, d: dict, source: str) -> "TraceModel":
        try:
            return cls(int(d["n_routed_experts"]), int(d["num_experts_per_tok"]), tuple(int(x) for x in d["moe_layers"]),
                       int(d["num_hidden_layers"]), str(d.get("model_type", "?")))
        except (KeyError, TypeError, ValueError) as e:
            raise TraceError(f"{source}: header.model is incomplete ({e!r}); the file is not a valid trace") from None

    def describe(self) -> str:
        return f"{len(self.moe_layers)} MoE layers x {self.n_experts} experts, top-{self.top_k}"

    def check(self, other: "TraceModel", what: str = "the trace") -> None:
        """Raise TraceError unless `other` (e.g. the model being run) has this routing shape."""
        if (self.n_experts, self.top_k, self.moe_layers) != (other.n_experts, other.top_k, other.moe_layers):
            raise TraceError(f"{what} was made for a model with {self.describe()} (MoE layers "
                             f"{span(self.moe_layers)}), but this model has {other.describe()} (MoE layers "
                             f"{span(other.moe_layers)}); profile this model again, or pass the matching model")


def span(layers) -> str:
    layers = list(layers)
    if not layers:
        return "none"
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}..{layers[-1]}" if contiguous else ",".join(map(str, layers))
