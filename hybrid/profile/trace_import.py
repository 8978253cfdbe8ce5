"""Import routing recorded by SGLang, so K2 users can profile the traffic their server really serves.

Three inputs (all logical expert ids after import; the trace keeps only the config's MoE layers):
- SGLang expert-distribution recorder, `--expert-distribution-recorder-mode per_token`, dumped via
  /dump_expert_distribution_record: a torch file {"records": [{"topk_ids_of_layer": int [layers, tokens, top_k]
  (physical ids, -1 pads), "positions": [tokens], "forward_mode": int (1 extend, 2 decode, 3 mixed), ...}],
  "last_physical_to_logical_map": int [layers, physical]}. Each record is one forward pass.
- the same recorder in `stat` mode: {"logical_count": int [passes, layers, experts], ...}: counts only, so a
  count-only trace (frequency, coverage and placement can be computed; replay needs per_token mode).
- responses of requests sent with `return_routed_experts`: JSONL, one response per line, with
  `routed_experts` (nested lists [tokens, layers, top_k] or base64 of int32) at top level or in `meta_info`,
  and `prompt_tokens` beside it; dense layers are zero rows there and are dropped.
Layer axes may cover all num_hidden_layers (SGLang's default, dense rows unused) or just the MoE layers.
Per-token dumps carry no request ids: a request starts where a token's position is 0, which is exact for
one-request-at-a-time serving; for batched serving, per-request statistics mix the interleaved requests.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from hybrid.profile.trace import PREFILL, DECODE, Trace, TraceError, TraceModel, from_arrays

_DECODE_MODE = 2        # SGLang ForwardMode.DECODE (IntEnum: EXTEND=1, DECODE=2, MIXED=3, IDLE=4)


def _moe_rows(a: np.ndarray, model: TraceModel, axis: int, source: str) -> np.ndarray:
    """Keep the MoE layers of a layer axis that spans all hidden layers or only the MoE layers."""
    n = a.shape[axis]
    if n == model.num_hidden_layers:
        return np.take(a, list(model.moe_layers), axis=axis)
    if n == len(model.moe_layers):
        return a
    raise TraceError(f"{source}: routing covers {n} layers, but the model has {model.num_hidden_layers} layers "
                     f"({len(model.moe_layers)} MoE); it was recorded from a different model: pass its config")


def _check_ids(a: np.ndarray, model: TraceModel, source: str) -> np.ndarray:
    if a.shape[-1] != model.top_k:
        raise TraceError(f"{source}: {a.shape[-1]} experts per token, but the model routes to top-{model.top_k}")
    if a.size and (a.max() >= model.n_experts or a.min() < -1):
        raise TraceError(f"{source}: expert id {int(a.max())} is outside 0..{model.n_experts - 1}: the dump is "
                         f"from a model with more experts; pass its config")
    return a


def read_sglang_dump(path: str | Path, model: TraceModel) -> Trace:
    """A recorder dump (.pt) in per_token or stat mode -> Trace (count-only for stat mode)."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SGLang dump {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # torch raises many types for a damaged pickle/zip; all mean "unreadable"
        raise TraceError(f"{path} is not a readable SGLang recorder dump ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise TraceError(f"{path}: expected a dict from SGLang's recorder, got {type(data).__name__}")
    if "logical_count" in data:
        return _from_stat(np.asarray(data["logical_count"]), model, str(path))
    if "records" in data:
        return _from_per_token(data, model, str(path))
    raise TraceError(f"{path}: neither 'logical_count' (stat mode) nor 'records' (per_token mode) found; "
                     f"keys are {sorted(data)}")


def from_logical_count(counts, model: TraceModel, source: str = "logical_count") -> Trace:
    """[passes, layers, experts] or [layers, experts] counts (SGLang stat mode, KTransformers) -> count-only Trace."""
    return _from_stat(np.asarray(counts), model, source)


def _from_stat(counts: np.ndarray, model: TraceModel, source: str) -> Trace:
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3 or counts.shape[2] != model.n_experts:
        raise TraceError(f"{source}: logical_count has shape {counts.shape}, expected [passes, layers, "
                         f"{model.n_experts}] for {model.describe()}")
    c = _moe_rows(counts.sum(axis=0).astype(np.int64), model, 0, source)
    t = from_arrays(model, [], source="sglang-stat", params={"file": source})
    t.counts = c
    return t.validate(source)


def _from_per_token(data: dict, model: TraceModel, source: str) -> Trace:
    p2l = data.get("last_physical_to_logical_map")
    p2l = None if p2l is None else _moe_rows(np.asarray(p2l), model, 0, source)
    ids, pos, phase, bounds = [], [], [], []
    n = 0
    for rec in sorted(data["records"], key=lambda r: r.get("forward_pass_id", 0)):
        a = _moe_rows(np.asarray(rec["topk_ids_of_layer"]).astype(np.int64), model, 0, source)  # [L, T, k]
        if p2l is not None:
            valid = a >= 0
            a = np.where(valid, np.take_along_axis(p2l[:, None, :].repeat(a.shape[1], 1),
                                                   np.clip(a, 0, p2l.shape[1] - 1), axis=2), -1)
        a = _check_ids(a.transpose(1, 0, 2), model, source)                 # [T, L, k]
        p = np.asarray(rec.get("positions", np.arange(len(a))), dtype=np.int64)
        ids.append(a)
        pos.append(p)
        phase.append(np.full(len(a), DECODE if rec.get("forward_mode") == _DECODE_MODE else PREFILL, np.uint8))
        bounds.append(n)
        n += len(a)
    if not ids:
        raise TraceError(f"{source}: the dump holds no forward passes; record while traffic runs")
    ids, pos, phase = np.concatenate(ids), np.concatenate(pos), np.concatenate(phase)
    starts = sorted(set(np.flatnonzero(pos == 0).tolist()) | {0})
    cuts = sorted(set(bounds) | set(starts) | {n})
    reqs, steps = [], []
    for r, s in enumerate(starts):
        e = starts[r + 1] if r + 1 < len(starts) else n
        reqs.append((ids[s:e], int((phase[s:e] == PREFILL).sum())))
        steps.append([b - a for a, b in zip(cuts, cuts[1:]) if s <= a < e])
    t = from_arrays(model, reqs, source="sglang-per-token", params={"file": source}, steps=steps)
    t.phase = phase            # keep SGLang's own prefill/decode labels (mixed batches interleave)
    return t.validate(source)


def read_routed_experts(path: str | Path, model: TraceModel) -> Trace:
    """JSONL of SGLang responses with `routed_experts` (return_routed_experts=True) -> Trace."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"routed-experts file {path} does not exist")
    reqs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: not JSON ({e}); give one response object per line") from None
        meta = obj.get("meta_info", obj) if isinstance(obj, dict) else {}
        if "routed_experts" not in meta:
            raise TraceError(f"{where}: no 'routed_experts' field; send requests with return_routed_experts=True")
        a = _decode_routed(meta["routed_experts"], model, where)
        reqs.append((a, int(meta.get("prompt_tokens", len(a)))))
    if not reqs:
        raise TraceError(f"{path} holds no responses")
    return from_arrays(model, reqs, source="sglang-routed-experts", params={"file": str(path)})


def _decode_routed(value, model: TraceModel, where: str) -> np.ndarray:
    if isinstance(value, str):
        flat = np.frombuffer(base64.b64decode(value), dtype=np.int32)
        for layers in (model.num_hidden_layers, len(model.moe_layers)):
            if flat.size % (layers * model.top_k) == 0:
                a = flat.reshape(-1, layers, model.top_k)
                break
        else:
            raise TraceError(f"{where}: {flat.size} ids do not divide into [tokens, layers, {model.top_k}]")
    else:
        a = np.asarray(value, dtype=np.int64)
        if a.ndim != 3:
            raise TraceError(f"{where}: routed_experts has shape {a.shape}, expected [tokens, layers, top_k]")
    return _check_ids(_moe_rows(a.astype(np.int64), model, 1, where), model, where)
