"""report.md: what a trace's analysis says, as a typed summary (summarize), and its rendering (render_markdown).

    render_markdown(summarize(trace, results, place)) -> str

summarize reads the trace, hybrid.profile.analysis.analyze's results and the placement written for the budget;
render_markdown only formats: one function per section (header, concentration, reuse, look-ahead, replay,
placement), each skipped when the summary has nothing for it (a counts-only trace has no per-token sections).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hybrid.profile.analysis import CONCENTRATION, n_of
from hybrid.profile.trace import Trace

# The routing model's settings a synthetic trace's report lists (hybrid/profile/synth.py SynthParams).
SYNTH_KEYS = ("n_requests", "prompt_tokens", "new_tokens", "global_skew", "request_skew", "segment_skew",
              "token_skew", "segment_len", "layer_affinity", "seed")


@dataclass(frozen=True)
class Share:
    """A share of activations or predictions; None when the trace cannot say (no tokens of that kind)."""
    value: float | None

    def __str__(self) -> str:
        return "n/a" if self.value is None else f"{100 * self.value:.1f} %"


@dataclass(frozen=True)
class Concentration:
    """Activations served by the top experts of each layer, chosen by `chooser` ("global": the trace's
    frequency; "request": each request's own counts), one share per CONCENTRATION fraction."""
    chooser: str
    shares: tuple[Share, ...]


@dataclass(frozen=True)
class Reuse:
    """Shares of activations by tokens since the same request last used the expert in the layer."""
    previous: Share
    within_4: Share
    within_16: Share
    within_64: Share
    first_use: Share
    median: float


@dataclass(frozen=True)
class Prediction:
    """One look-ahead predictor at one layer distance ("L+1", or "hints" for the trace's own hints)."""
    distance: str
    predictor: str
    precision: Share
    recall: Share


@dataclass(frozen=True)
class ReplayCell:
    hit_rate: Share
    decode_hit_rate: Share
    loads_per_token: float


@dataclass(frozen=True)
class Replay:
    """Policy replay: one row of cells per policy, one cell per hot-set fraction."""
    layers: tuple[int, ...]
    loads_budget: float                          # experts per token per layer; inf = unlimited
    fractions: tuple[float, ...]
    rows: tuple[tuple[str, tuple[ReplayCell, ...]], ...]


@dataclass(frozen=True)
class ReportSummary:
    """Everything report.md states. Per-token sections are None (or empty) for a counts-only trace."""
    source: str
    model_type: str
    routing_shape: str                           # TraceModel.describe()
    first_layer: int
    last_layer: int
    n_requests: int
    n_tokens: int
    prefill_tokens: int
    decode_tokens: int
    n_experts: int
    top_k: int
    synth_params: tuple[tuple[str, object], ...] | None
    has_tokens: bool
    concentration: tuple[Concentration, ...]
    reuse: Reuse | None
    lookahead: tuple[Prediction, ...] | None
    replay: Replay | None
    placement_experts: int
    placement_fraction: float
    placement_hit_rate: Share


def summarize(trace: Trace, res: dict, place: dict) -> ReportSummary:
    """The summary of `trace`, its analysis `res` (analysis.analyze) and the placement written (`place`)."""
    m, ph = trace.model, trace.phase
    synth = tuple((k, trace.params.get(k)) for k in SYNTH_KEYS) if trace.source == "synth" else None
    return ReportSummary(
        trace.source, m.model_type, m.describe(), m.moe_layers[0], m.moe_layers[-1], trace.n_requests,
        trace.n_tokens, int((ph == 0).sum()), int((ph == 1).sum()), m.n_experts, m.top_k, synth, trace.has_tokens,
        _concentration(res["coverage"]), _reuse(res.get("reuse")), _lookahead(res.get("lookahead")),
        _replay(res), place["experts_per_layer"], place["fraction"], Share(place["expected_hit_rate"]))


def _concentration(cov: dict) -> tuple[Concentration, ...]:
    return tuple(Concentration(key, tuple(Share(cov[key].get(f)) for f in CONCENTRATION))
                 for key in ("global", "request") if cov.get(key))


def _reuse(r: dict | None) -> Reuse | None:
    if not r:
        return None
    return Reuse(Share(r["d1"]), Share(r["le4"]), Share(r["le16"]), Share(r["le64"]), Share(r["first"]), r["median"])


def _lookahead(la: dict | None) -> tuple[Prediction, ...] | None:
    """analysis.lookahead's {distance: {predictor: scores}}, where "hints" maps to the scores directly."""
    if la is None:
        return None
    return tuple(Prediction(d, name, Share(v["precision"]), Share(v["recall"]))
                 for d, by in la.items() for name, v in (by.items() if d != "hints" else [("hints", by)]))


def _replay(res: dict) -> Replay | None:
    if "replay" not in res:
        return None
    by_policy = res["replay"]
    fractions = tuple(sorted(next(iter(by_policy.values()), {})))
    rows = tuple((name, tuple(ReplayCell(Share(v["hit_rate"]), Share(v["decode_hit_rate"]), v["loads_per_token"])
                              for _, v in sorted(by_f.items())))
                 for name, by_f in by_policy.items())
    return Replay(tuple(res["replay_layers"]), res["loads_per_token_budget"], fractions, rows)


# ---- rendering -----------------------------------------------------------------------------------------
def render_markdown(s: ReportSummary) -> str:
    lines = _header(s) + _concentration_md(s)
    if s.reuse is not None:
        lines += _reuse_md(s.reuse)
    if s.lookahead is not None:
        lines += _lookahead_md(s.lookahead, s.top_k)
    if s.replay is not None:
        lines += _replay_md(s.replay)
    return "\n".join(lines + _placement_md(s))


def _header(s: ReportSummary) -> list[str]:
    lines = ["# Expert routing profile", "",
             f"Trace: `{s.source}`, model {s.model_type} ({s.routing_shape}, MoE layers "
             f"{s.first_layer}..{s.last_layer}), {s.n_requests} requests, {s.n_tokens} tokens "
             f"({s.prefill_tokens} prefill, {s.decode_tokens} decode).", ""]
    if s.synth_params is not None:
        lines += ["Synthetic trace (routing model: hybrid/profile/synth.py, calibrated to KTransformers' published "
                  "10 % placement figures): " + ", ".join(f"{k} {v}" for k, v in s.synth_params) + ".", ""]
    if not s.has_tokens:
        lines += ["This trace holds counts only (SGLang stat mode): per-request concentration, reuse, look-ahead "
                  "and policy replay need per-token routing (`--expert-distribution-recorder-mode per_token`).", ""]
    return lines


def _concentration_md(s: ReportSummary) -> list[str]:
    head = " | ".join(f"top {100 * f:g} % ({n_of(f, s.n_experts)})" for f in CONCENTRATION)
    return (["## Concentration", "",
             "Share of activations served by the top experts of each layer, chosen by the whole trace's "
             "frequency (global) or by each request's own counts (request, an oracle of its statistics). "
             "KTransformers' published figures for 10 %: global ~19 %, request ~45 %.", "",
             f"| experts per layer | {head} |", "|---|" + "---|" * len(CONCENTRATION)]
            + [f"| {c.chooser} | " + " | ".join(map(str, c.shares)) + " |" for c in s.concentration]
            + ["", "![coverage curves](coverage.png)", "", "![expert x layer heatmap](heatmap.png)", ""])


def _reuse_md(r: Reuse) -> list[str]:
    return ["## Reuse distance", "",
            "Tokens since the same request last used the same expert in the same layer.", "",
            "| previous token | <= 4 | <= 16 | <= 64 | first use | median |", "|---|---|---|---|---|---|",
            f"| {r.previous} | {r.within_4} | {r.within_16} | {r.within_64} | {r.first_use} | {r.median:g} |", ""]


def _lookahead_md(predictions: tuple[Prediction, ...], top_k: int) -> list[str]:
    return (["## Look-ahead", "",
             f"Predicting layer L+d's {top_k} experts from layer L's choice of the same token (affinity: "
             "co-occurrence counted on held-out requests; baseline: layer L+d's most frequent experts).", "",
             "| distance | predictor | precision | recall |", "|---|---|---|---|"]
            + [f"| {p.distance} | {p.predictor} | {p.precision} | {p.recall} |" for p in predictions] + [""])


def _replay_md(r: Replay) -> list[str]:
    budget = "unlimited" if math.isinf(r.loads_budget) else f"{r.loads_budget:g} experts per token per layer"
    return (["## Hit rate by policy and hot-set size", "",
             f"Replay through hybrid.core.policies on MoE layers {list(r.layers)}; transfer budget {budget}. "
             "Cells: hit rate (decode-only hit rate) / loads per token per layer. Static starts from "
             "this trace's own top experts (placement.json); the others start empty.", "",
             "| policy | " + " | ".join(f"{100 * f:g} %" for f in r.fractions) + " |",
             "|---|" + "---|" * len(r.fractions)]
            + [f"| {name} | " + " | ".join(f"{c.hit_rate} ({c.decode_hit_rate}) / {c.loads_per_token:.2f}"
                                           for c in cells) + " |" for name, cells in r.rows]
            + ["", "![hit rate vs budget](hit_rate.png)", ""])


def _placement_md(s: ReportSummary) -> list[str]:
    return ["## Placement", "",
            f"`placement.json`: the top {s.placement_experts} experts of each MoE layer "
            f"({100 * s.placement_fraction:g} % of {s.n_experts}) by frequency in this trace; it serves "
            f"{s.placement_hit_rate} of this trace's activations. Use it with "
            "`hybrid generate --prefetch static --placement placement.json`.", "",
            "`logical_count.json`: the same counts as `{\"logical_count\": [1, layers, experts]}` for "
            "KTransformers' SGLang integration (`--init-expert-location logical_count.json "
            "--kt-expert-placement-strategy frequency`).", ""]
