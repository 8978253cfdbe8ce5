"""Profile outputs: report.md with tables, PNG plots, placement.json and the KTransformers/SGLang counts file.

Files written by write_report(trace, results, out_dir, fraction):
    report.md          tables (concentration, reuse, look-ahead, hit rate per policy and budget) and the plots
                       (hybrid/profile/report_md.py: the summary it states and its rendering)
    heatmap.png        expert x layer activation share (1 = uniform)
    hit_rate.png       hit rate vs hot-set size, per policy, with the coverage bounds
    coverage.png       share of activations covered vs share of experts: global frequency and per request
    placement.json     the best static hot set for the budget (hybrid/core/placement_file.py: its layout, the reader)
    logical_count.json {"logical_count": [1, num_hidden_layers, n_experts]}: KTransformers' SGLang integration
                       loads it with --init-expert-location and --kt-expert-placement-strategy frequency
    analysis.json      every number in the report
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from hybrid.core.placement_file import write_placement_file
from hybrid.profile.analysis import coverage, n_of, placement, request_counts
from hybrid.profile.report_md import render_markdown, summarize
from hybrid.profile.trace import Trace


# ---- placement files -----------------------------------------------------------------------------------
def write_placement(path: str | Path, trace: Trace, fraction: float) -> dict:
    """Write placement.json for `fraction` of each layer's experts; returns what was written."""
    place = placement(trace, fraction)
    cov = coverage(trace, (fraction,))["global"][fraction]
    return write_placement_file(path, trace.model, fraction, n_of(fraction, trace.model.n_experts), cov,
                                trace.source, place)


def write_logical_count(path: str | Path, trace: Trace) -> None:
    """{"logical_count": [1, num_hidden_layers, n_experts]} (dense layers as zero rows), SGLang's layout."""
    m = trace.model
    full = np.zeros((1, m.num_hidden_layers, m.n_experts), dtype=np.int64)
    full[0, list(m.moe_layers)] = trace.layer_counts()
    Path(path).write_text(json.dumps({"logical_count": full.tolist()}) + "\n")


# ---- plots ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmap(trace: Trace, path: Path) -> None:
    plt = _plt()
    c = trace.layer_counts().astype(np.float64)
    rel = c / np.maximum(c.sum(axis=1, keepdims=True), 1) * trace.model.n_experts   # 1 = uniform
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.08 * len(rel)))
    im = ax.imshow(rel, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, float(np.percentile(rel, 99.5))),
                   interpolation="nearest")
    ax.set_xlabel("expert id")
    ticks = sorted(set(np.linspace(0, len(rel) - 1, min(len(rel), 8)).round().astype(int).tolist()))
    ax.set_yticks(ticks, [str(trace.model.moe_layers[i]) for i in ticks])
    ax.set_ylabel("MoE layer")
    ax.set_title("activation share x experts (1 = uniform)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_hit_rate(results: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, by_f in results["replay"].items():
        fs = sorted(by_f)
        ax.plot([100 * f for f in fs], [100 * by_f[f]["hit_rate"] for f in fs], marker="o", label=name)
    req = results["coverage_curve"]
    ax.plot(req["percent"], req["request"], "k--", lw=1, label="request oracle (own stats)")
    ax.set_xlabel("hot set, % of each layer's experts")
    ax.set_ylabel("hit rate, % of activations")
    ax.set_xlim(0, 52)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("hit rate vs budget (trace replay)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_coverage(results: dict, path: Path) -> None:
    plt = _plt()
    cc = results["coverage_curve"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(cc["percent"], cc["global"], label="top experts by global frequency")
    if cc["request"]:
        ax.plot(cc["percent"], cc["request"], label="top experts by the request's own counts")
    ax.plot([0, 100], [0, 100], "k:", lw=1, label="uniform")
    ax.set_xlabel("% of each layer's experts")
    ax.set_ylabel("% of activations covered")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def coverage_curve(trace: Trace, points: int = 50) -> dict:
    """Coverage (%) at `points` evenly spaced hot-set sizes from 1 expert to all: global and per request."""
    E = trace.model.n_experts
    ns = sorted(set(np.linspace(1, E, min(points, E)).round().astype(int).tolist()))
    out = {"percent": [100 * n / E for n in ns], "global": [], "request": []}
    for counts, key in ((trace.layer_counts(), "global"),
                        (request_counts(trace) if trace.has_tokens else None, "request")):
        if counts is None:
            continue
        s = np.cumsum(-np.sort(-counts, axis=-1), axis=-1).reshape(-1, E).sum(axis=0)
        out[key] = [100 * float(s[n - 1]) / max(float(s[-1]), 1.0) for n in ns]
    return out


# ---- report.md -----------------------------------------------------------------------------------------
def write_report(trace: Trace, results: dict, out_dir: str | Path, fraction: float = 0.10) -> dict[str, Path]:
    """Write report.md, the plots, placement.json, logical_count.json and analysis.json into out_dir.
    `results` comes from hybrid.profile.analysis.analyze(trace). Returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results, coverage_curve=coverage_curve(trace))
    files = {"report": out / "report.md", "heatmap": out / "heatmap.png", "placement": out / "placement.json",
             "logical_count": out / "logical_count.json", "analysis": out / "analysis.json",
             "coverage": out / "coverage.png"}
    place = write_placement(files["placement"], trace, fraction)
    write_logical_count(files["logical_count"], trace)
    plot_heatmap(trace, files["heatmap"])
    plot_coverage(results, files["coverage"])
    if "replay" in results:
        files["hit_rate"] = out / "hit_rate.png"
        plot_hit_rate(results, files["hit_rate"])
    files["analysis"].write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    files["report"].write_text(render_markdown(summarize(trace, results, place)))
    return files


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x
