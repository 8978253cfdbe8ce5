"""The slow, obvious reference for every expert and dense kernel: dequantize with the numpy codecs, then float64.

Expert(x) = down(silu(gate x) * up x). The fast kernels accumulate in float32 (or int32 on int8
activations); tests compare them to this with a tolerance stated per path.
"""
from __future__ import annotations

import numpy as np


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def expert_forward(gate: np.ndarray, up: np.ndarray, down: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x [T, H] -> [T, H] in float64, weights float [I, H], [I, H], [H, I]."""
    x = np.asarray(x, dtype=np.float64)
    a = silu(x @ gate.T.astype(np.float64)) * (x @ up.T.astype(np.float64))
    return a @ down.T.astype(np.float64)


def moe_forward(store, hidden: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
    """sum_j w[t, j] * Expert_{ids[t, j]}(hidden[t]) in float64; ids of -1 are skipped."""
    T = hidden.shape[0]
    out = np.zeros((T, store.spec.hidden), dtype=np.float64)
    for e in np.unique(topk_ids[topk_ids >= 0]):
        t, j = np.nonzero(topk_ids == e)
        y = expert_forward(*store.dequantize(int(e)), hidden[t])
        np.add.at(out, t, topk_weights[t, j].astype(np.float64)[:, None] * y)
    return out


def linear_forward(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The reference of PackedLinear in float64: w float [G, N, K] (PackedMatrix.dequantize()), x [T, K] when
    G == 1 -> [T, N] = x @ W^T; x [T, G, K] when G > 1 -> [T, G, N], row t, g = W[g] @ x[t, g]."""
    w = np.asarray(w, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if w.shape[0] == 1 and x.ndim == 2:
        return x @ w[0].T
    return np.einsum("tgk,gnk->tgn", x, w)
