"""What a routing trace says about hot sets: frequencies, concentration, reuse, look-ahead, policy what-ifs.

# N = tokens, L = MoE layers, E = experts, k = experts per token; "n of f" = max(1, round(f * E)) experts

Every hit rate here comes from replaying the trace through hybrid.core.policies (the classes the engine uses),
one policy instance per layer, one access() per forward step, end_request() between requests.
Coverage figures are in-sample: the hot set is chosen from the same tokens it is scored on, as in the
KTransformers table the synthetic generator is calibrated to.
"""
from __future__ import annotations

import math

import numpy as np

from hybrid.core.policies import POLICIES, make_policy
from hybrid.core.progress import bar
from hybrid.profile.trace import DECODE, Trace

CONCENTRATION = (0.01, 0.05, 0.10, 0.25)
BUDGETS = (0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.40, 0.50)


def n_of(fraction: float, n_experts: int) -> int:
    """Hot-set size for a fraction of the experts: max(1, round(fraction * E))."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a hot-set fraction must lie in (0, 1], got {fraction}")
    return max(1, round(fraction * n_experts))


def layer_frequency(trace: Trace) -> np.ndarray:
    """float64 [L, E]: each expert's share of its layer's activations (rows sum to 1, or 0 if empty)."""
    c = trace.layer_counts().astype(np.float64)
    tot = c.sum(axis=1, keepdims=True)
    return np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)


def top_experts(counts: np.ndarray, n: int) -> np.ndarray:
    """int [.., n]: the n most-counted experts along the last axis, most first (ties: lower id first)."""
    return np.argsort(-counts, axis=-1, kind="stable")[..., :n]


def _covered(counts: np.ndarray, n: int) -> tuple[float, float]:
    """(activations on the n most-counted experts, all activations), summed over leading axes."""
    s = -np.sort(-counts, axis=-1)
    return float(s[..., :n].sum()), float(s.sum())


def request_counts(trace: Trace) -> np.ndarray:
    """int64 [R, L, E]: expert counts of each request."""
    L, E = len(trace.model.moe_layers), trace.model.n_experts
    out = np.zeros((trace.n_requests, L, E), dtype=np.int64)
    req_of = np.repeat(np.arange(trace.n_requests), np.diff(trace.req))
    key = (req_of[:, None, None] * L + np.arange(L)[None, :, None]) * E + trace.ids.astype(np.int64)
    key = key[trace.ids >= 0]
    out.ravel()[:] = np.bincount(key, minlength=out.size)
    return out


def coverage(trace: Trace, fractions=CONCENTRATION) -> dict:
    """Share of activations served by the top n-of-f experts of each layer, chosen two ways:
    "global": by the whole trace's frequency; "request": by each request's own counts (an oracle of the
    request's statistics). Pooled over layers (and requests). Count-only traces give "global" only."""
    E = trace.model.n_experts
    glob = trace.layer_counts()
    out = {"global": {}, "request": {}}
    per_req = request_counts(trace) if trace.has_tokens else None
    for f in fractions:
        c, t = _covered(glob, n_of(f, E))
        out["global"][f] = c / t if t else 0.0
        if per_req is not None:
            c, t = _covered(per_req, n_of(f, E))
            out["request"][f] = c / t if t else 0.0
    return out


def reuse_distance(trace: Trace) -> dict:
    """Tokens since the same request last used the same expert in the same layer, over all activations.
    Returns shares: "d1" (the previous token used it), "le4", "le16", "le64", "first" (no earlier use), and
    "median" of the finite distances."""
    d_all = []
    N, L, k = trace.ids.shape
    req_of = np.repeat(np.arange(trace.n_requests), np.diff(trace.req))
    tok = np.broadcast_to(np.arange(N)[:, None], (N, k))
    for li in range(L):
        ids = trace.ids[:, li, :]
        m = ids >= 0
        e, t, r = ids[m].astype(np.int64), tok[m], req_of[tok[m]]
        order = np.lexsort((t, e, r))
        e, t, r = e[order], t[order], r[order]
        same = (e[1:] == e[:-1]) & (r[1:] == r[:-1])
        d = np.full(len(t), -1, dtype=np.int64)
        d[1:][same] = t[1:][same] - t[:-1][same]
        d_all.append(d)
    d = np.concatenate(d_all) if d_all else np.zeros(0, np.int64)
    if not len(d):
        return {}
    fin = d[d > 0]
    share = lambda x: float(x) / len(d)
    return {"d1": share((d == 1).sum()), "le4": share(((d > 0) & (d <= 4)).sum()),
            "le16": share(((d > 0) & (d <= 16)).sum()), "le64": share(((d > 0) & (d <= 64)).sum()),
            "first": share((d < 0).sum()), "median": float(np.median(fin)) if len(fin) else math.inf}


def lookahead(trace: Trace, distances=(1, 2), size: int | None = None, max_tokens: int = 4096) -> dict:
    """Precision and recall of predicting layer l+d's experts from layer l's choice of the same token.

    With hints in the trace (d = 1 only), the hints are scored. Otherwise an affinity estimate: a
    co-occurrence table C[e, e'] (layer l chose e, layer l+d chose e') counted on the even requests
    (the first half of the tokens for a single request), then on held-out tokens the `size` (default k)
    experts with the highest summed C over the token's layer-l experts are predicted. "baseline" is the
    same with layer l+d's top experts by frequency (no affinity). precision = hits / predicted,
    recall = hits / actual; equal when size = k and no slot is empty."""
    N, L, k = trace.ids.shape
    E, m = trace.model.n_experts, size or trace.model.top_k
    train, test = _split(trace)
    out = {}
    if trace.hints is not None:
        out["hints"] = _score(trace.hints[test].reshape(-1, trace.hints.shape[2]),
                              trace.ids[test].reshape(-1, k))
    test = test[:max_tokens]
    for d in distances:
        if d >= L:
            continue
        hits = {"affinity": [0, 0, 0], "baseline": [0, 0, 0]}
        for li in range(L - d):
            src_tr, dst_tr = trace.ids[train, li].astype(np.int64), trace.ids[train, li + d].astype(np.int64)
            ok = (src_tr[:, :, None] >= 0) & (dst_tr[:, None, :] >= 0)
            pair = (src_tr[:, :, None] * E + dst_tr[:, None, :])[ok]
            C = np.bincount(pair, minlength=E * E).reshape(E, E).astype(np.float32)
            freq = np.bincount(dst_tr[dst_tr >= 0], minlength=E)
            src, dst = trace.ids[test, li].astype(np.int64), trace.ids[test, li + d]
            score = np.where((src >= 0)[:, :, None], C[np.clip(src, 0, E - 1)], 0).sum(axis=1)
            score += 1e-6 * freq         # break ties (unseen experts) by frequency
            for name, pred in (("affinity", top_experts(score, m)),
                               ("baseline", np.broadcast_to(top_experts(freq, m), (len(test), m)))):
                h = _hits(pred, dst)
                hits[name][0] += h
                hits[name][1] += pred.size
                hits[name][2] += int((dst >= 0).sum())
        out[f"L+{d}"] = {n: {"precision": v[0] / v[1] if v[1] else 0.0, "recall": v[0] / v[2] if v[2] else 0.0}
                         for n, v in hits.items()}
    return out


def _split(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    if trace.n_requests >= 2:
        req_of = np.repeat(np.arange(trace.n_requests), np.diff(trace.req))
        return np.flatnonzero(req_of % 2 == 0), np.flatnonzero(req_of % 2 == 1)
    half = trace.n_tokens // 2
    return np.arange(half), np.arange(half, trace.n_tokens)


def _hits(pred: np.ndarray, actual: np.ndarray) -> int:
    a = np.where(actual >= 0, actual, -2)[:, None, :]
    return int(((pred[:, :, None] == a) & (pred[:, :, None] >= 0)).any(axis=2).sum())


def _score(pred: np.ndarray, actual: np.ndarray) -> dict:
    h, n_pred, n_act = _hits(pred, actual), int((pred >= 0).sum()), int((actual >= 0).sum())
    return {"precision": h / n_pred if n_pred else 0.0, "recall": h / n_act if n_act else 0.0}


def replay_layers(trace: Trace, max_layers: int | None) -> list[int]:
    """Evenly spaced layer indices (into the trace's layer axis) to replay; all when max_layers is None."""
    L = len(trace.model.moe_layers)
    if max_layers is None or max_layers >= L:
        return list(range(L))
    return sorted(set(np.linspace(0, L - 1, max_layers).round().astype(int).tolist()))


def replay(trace: Trace, policies=POLICIES, fractions=BUDGETS, layers: list[int] | None = None,
           loads_per_token: float = math.inf) -> dict:
    """Hit rate of each policy at each hot-set fraction, by replaying the trace through hybrid.core.policies.

    Static starts from the trace's own top experts per layer (the placement.json this trace would give);
    the others start empty. Router receives the trace's hints, if any, before each step.
    Returns {policy: {fraction: {"hit_rate", "loads_per_token", and the same split by phase: "decode_hit_rate",
    "prefill_hit_rate", "decode_loads_per_token", "prefill_loads_per_token" (None for a phase with no
    tokens)}}} pooled over `layers` (indices into the trace's layer axis; default all); loads are per token
    per layer."""
    if not trace.has_tokens:
        raise ValueError("this trace holds counts only (e.g. SGLang stat mode): replay needs per-token routing; "
                         "record with --expert-distribution-recorder-mode per_token")
    layers = list(range(len(trace.model.moe_layers))) if layers is None else layers
    E = trace.model.n_experts
    counts = trace.layer_counts()
    starts = trace.step[:-1]
    spans = list(zip(starts.tolist(), trace.step[1:].tolist(), (trace.phase[starts] == DECODE).tolist()))
    new_req = set(trace.req[1:-1].tolist())
    out = {}
    progress = bar(len(policies) * len(fractions) * len(layers), "replay", "layer")
    for name in policies:
        out[name] = {}
        for f in fractions:
            cap = n_of(f, E)
            hits = valid = d_hits = d_valid = loads = d_loads = d_tokens = 0
            for li in layers:
                progress.update()
                resident = top_experts(counts[li], cap).tolist() if name == "static" else ()
                p = make_policy(name, E, cap, loads_per_token, resident=resident)
                ids_l = trace.ids[:, li, :]
                for s, e, dec in spans:
                    if s in new_req:
                        p.end_request()
                    if trace.hints is not None:
                        p.hint(trace.hints[s:e, li])
                    x = ids_l[s:e]
                    dcs = p.access(x, "decode" if dec else "prefill")
                    h, v = int(dcs.hits.sum()), int((x >= 0).sum())
                    hits, valid, loads = hits + h, valid + v, loads + len(dcs.load)
                    if dec:
                        d_hits, d_valid = d_hits + h, d_valid + v
                        d_loads, d_tokens = d_loads + len(dcs.load), d_tokens + (e - s)
            nl = max(1, len(layers))
            p_valid, p_tokens = valid - d_valid, trace.n_tokens * nl - d_tokens
            out[name][f] = {"hit_rate": hits / valid if valid else 0.0,
                            "decode_hit_rate": d_hits / d_valid if d_valid else None,
                            "prefill_hit_rate": (hits - d_hits) / p_valid if p_valid else None,
                            "loads_per_token": loads / (trace.n_tokens * nl),
                            "decode_loads_per_token": d_loads / d_tokens if d_tokens else None,
                            "prefill_loads_per_token": (loads - d_loads) / p_tokens if p_tokens else None}
    progress.close()
    return out


def placement(trace: Trace, fraction: float) -> dict[int, list[int]]:
    """The best static hot set for a budget: per MoE layer (model layer index), the top n-of-fraction experts
    by this trace's frequency, most used first."""
    n = n_of(fraction, trace.model.n_experts)
    top = top_experts(trace.layer_counts(), n)
    return {layer: [int(e) for e in top[i]] for i, layer in enumerate(trace.model.moe_layers)}


def analyze(trace: Trace, fractions=BUDGETS, max_layers: int | None = 4, loads_per_token: float = math.inf,
            policies=POLICIES) -> dict:
    """Everything the report shows, as plain numbers. Replay runs on `max_layers` evenly spaced layers
    (all when None): replay runs at Python speed (~40 us per access(); 32k K2 tokens take ~13 s per layer for
    4 policies x 10 budgets on this 2-core machine); frequency statistics always use every layer."""
    res = {"model": trace.model.to_json(), "source": trace.source, "n_tokens": trace.n_tokens,
           "n_requests": trace.n_requests, "coverage": coverage(trace)}
    if not trace.has_tokens:
        return res
    layers = replay_layers(trace, max_layers)
    res["reuse"] = reuse_distance(trace)
    res["lookahead"] = lookahead(trace)
    res["replay_layers"] = [trace.model.moe_layers[i] for i in layers]
    res["loads_per_token_budget"] = loads_per_token
    res["replay"] = replay(trace, policies, fractions, layers, loads_per_token)
    return res
