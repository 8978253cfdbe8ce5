"""Synthetic routing traces with Kimi K2's shape (60 MoE layers x 384 experts, top-8), for planning hot sets
and testing prefetch policies before a real trace exists.

# N = tokens, L = MoE layers, E = experts, k = experts per token

Routing model. Token t of request r, in segment s (a run of tokens about one thing: a phrase, a code block),
chooses at MoE layer l the top-k experts of
    score[t, l, e] = sg * G[l, e] + sr * R[r, l, e] + ss * S[s, l, e] + st * Z[t, l, e] + Gumbel[t, l, e]
i.e. k draws without replacement from softmax(score - Gumbel) (the Gumbel-top-k trick). G, R, S, Z are
standard normal, each a level of the routing hierarchy:
- G, global: fixed per model; kept mild (sg small) because noaux_tc's bias balances load across experts;
- R, per request: strong (sr large): a request concentrates on its own subset of experts;
- S, per segment (geometric length, mean `segment_len`): short bursts of focus. This is the token-to-token
  reuse: consecutive tokens share experts more than tokens far apart;
- Z, per token, and the Gumbel noise: the rest.
Layer-to-layer affinity: every level X is correlated across layers through a fixed partner permutation
P_l of the experts: X[l] = rho * X[l-1][P_l] + sqrt(1 - rho^2) * fresh. Expert P_l[e] at layer l-1
predicts expert e at layer l, as a look-ahead gate would exploit; with rho = 0 the layers are independent.

Calibration target (KTransformers' published placement measurement, quoted in docs/architecture.md,
"The problem in numbers", and issue 6): placing 10 % of the experts by global frequency covers about 19 % of activations;
choosing them from the request's own statistics about 45 %. DEFAULT_PARAMS were fitted to these (coverage
measured as in hybrid.profile.analysis.coverage: pooled over requests and layers, in-sample, 38 of 384 experts) for
requests of 768 prompt + 256 decode tokens, 32 requests (the in-sample global figure falls as requests are
added, since each request's own skew averages out); measured at seed 0: see CALIBRATION.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from hybrid.core.progress import track
from hybrid.profile.trace import Trace, TraceModel, from_arrays

PRESETS = {
    "kimi-k2": TraceModel(384, 8, tuple(range(1, 61)), 61, "kimi_k2"),
    "deepseek-v3": TraceModel(256, 8, tuple(range(3, 61)), 61, "deepseek_v3"),
}

TARGETS = {"global_top10": 0.19, "request_top10": 0.45}     # KTransformers' table (see module docstring)
TOLERANCE = 0.03                                            # absolute; tests hold the generator to it


@dataclass(frozen=True)
class SynthParams:
    n_requests: int = 32
    prompt_tokens: int = 768
    new_tokens: int = 256
    prefill_chunk: int = 512          # tokens per prefill step, as the engine's default
    global_skew: float = 0.60         # sg
    request_skew: float = 1.95        # sr
    segment_skew: float = 1.20        # ss
    token_skew: float = 3.00          # st
    segment_len: float = 16.0         # mean tokens per segment
    layer_affinity: float = 0.95      # rho
    seed: int = 0


DEFAULT_PARAMS = SynthParams()
# Measured by `hybrid profile synth --config kimi-k2` (all 60 layers, DEFAULT_PARAMS, seed 0) and its report.
# Only the first two were fitted; look-ahead and reuse follow from the chosen affinity and segment settings,
# which no published K2 figure pins down. tests/profile/test_synth.py re-measures the fitted two on 3 layers.
CALIBRATION = {"global_top10": 0.190, "request_top10": 0.453,      # targets 0.19 and 0.45
               "lookahead_L+1_precision": 0.289, "lookahead_L+2_precision": 0.237,   # frequency baseline 0.039
               "reuse_previous_token": 0.091, "reuse_median_tokens": 11}


def synthesize(model: TraceModel | str = "kimi-k2", params: SynthParams = DEFAULT_PARAMS,
               n_layers: int | None = None) -> Trace:
    """A synthetic trace for `model` (a TraceModel or a preset name).

    Args:
        params: the routing model's parameters and the workload's shape (requests x tokens).
        n_layers: generate only the first n MoE layers (tests; the layers are statistically alike).
    Returns: Trace with ids, phase (prefill then decode per request), request and step offsets, no weights.
    """
    model = _model(model, n_layers)
    p = params
    if p.n_requests < 1 or p.prompt_tokens < 1 or p.new_tokens < 0:
        raise ValueError(f"need n_requests >= 1, prompt_tokens >= 1 and new_tokens >= 0, got {p.n_requests}, "
                         f"{p.prompt_tokens}, {p.new_tokens}")
    if not 0.0 <= p.layer_affinity < 1.0 or p.segment_len < 1.0:
        raise ValueError(f"layer_affinity must lie in [0, 1) and segment_len >= 1, got {p.layer_affinity}, "
                         f"{p.segment_len}")
    rng = np.random.default_rng(p.seed)
    L, E, k = len(model.moe_layers), model.n_experts, model.top_k
    T = p.prompt_tokens + p.new_tokens
    N = p.n_requests * T
    req_of = np.repeat(np.arange(p.n_requests), T)
    seg_of = _segments(rng, p.n_requests, T, p.segment_len)
    n_seg = int(seg_of.max()) + 1
    perms = [rng.permutation(E) for _ in range(L)]
    a, b = p.layer_affinity, math.sqrt(1.0 - p.layer_affinity ** 2)
    G = R = S = Z = None
    ids = np.empty((N, L, k), dtype=np.int16)
    for li in track(range(L), "synthesize", "layer"):
        G = _step(rng, G, (E,), perms[li], a, b)
        R = _step(rng, R, (p.n_requests, E), perms[li], a, b)
        S = _step(rng, S, (n_seg, E), perms[li], a, b)
        Z = _step(rng, Z, (N, E), perms[li], a, b)
        score = (p.global_skew * G)[None, :] + p.request_skew * R[req_of] + p.segment_skew * S[seg_of] \
            + p.token_skew * Z
        u = rng.random((N, E), dtype=np.float32)
        with np.errstate(divide="ignore"):
            score -= np.log(-np.log(u))         # Gumbel(0, 1) in float32: 2x faster than rng.gumbel
        top = np.argpartition(-score, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(score, top, axis=1), axis=1)   # router order: best first
        ids[:, li, :] = np.take_along_axis(top, order, axis=1)
    chunks = [min(p.prefill_chunk, p.prompt_tokens - s) for s in range(0, p.prompt_tokens, p.prefill_chunk)]
    reqs = [(ids[r * T:(r + 1) * T], p.prompt_tokens) for r in range(p.n_requests)]
    steps = [chunks + [1] * p.new_tokens] * p.n_requests
    params_json = {**asdict(p), "model": "synthetic", "targets": TARGETS}
    return from_arrays(model, reqs, source="synth", params=params_json, steps=steps)


def params_with(**changes) -> SynthParams:
    """DEFAULT_PARAMS with some fields replaced (unknown names raise TypeError)."""
    return replace(DEFAULT_PARAMS, **changes)


def _model(model, n_layers) -> TraceModel:
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"unknown config {model!r}; choose one of {', '.join(PRESETS)} or pass a model folder")
        model = PRESETS[model]
    if n_layers is not None:
        if not 1 <= n_layers <= len(model.moe_layers):
            raise ValueError(f"n_layers must lie in 1..{len(model.moe_layers)}, got {n_layers}")
        model = replace(model, moe_layers=model.moe_layers[:n_layers])
    return model


def _step(rng, prev, shape, perm, a, b) -> np.ndarray:
    """One layer of a latent level: fresh at the first layer, else AR(1) through the partner permutation."""
    fresh = rng.standard_normal(shape, dtype=np.float32)
    return fresh if prev is None else a * prev[..., perm] + b * fresh


def _segments(rng, n_requests: int, T: int, mean_len: float) -> np.ndarray:
    """int [n_requests * T]: a segment index per token; segments never span two requests."""
    out = np.empty(n_requests * T, dtype=np.int64)
    base = 0
    for r in range(n_requests):
        starts = rng.random(T) < 1.0 / mean_len
        starts[0] = True
        seg = np.cumsum(starts) - 1
        out[r * T:(r + 1) * T] = base + seg
        base += int(seg[-1]) + 1
    return out
