"""Routing traces: which experts every token chose in every MoE layer. Record, write, read, import.

# N = tokens (all requests, in order), L = MoE layers, k = experts per token, E = routed experts per layer

A trace file is a NumPy .npz archive (zip, deflate) holding:
    header   uint8 [bytes]   UTF-8 JSON: {"format": "hybrid-routing-trace", "version": 1, "source": ...,
                             "model": {model_type, n_routed_experts, num_experts_per_tok, num_hidden_layers,
                             moe_layers}, "n_tokens": N, "requests": [{"prompt_tokens", "new_tokens"}, ...],
                             "params": {...} (how it was made: synth parameters, prompt file, ...)}
    ids      int16 [N, L, k] expert ids, -1 = no expert (SGLang pads with -1 too); layer axis follows
                             header.model.moe_layers (model layer indices, dense layers omitted)
    phase    uint8 [N]       0 = prefill, 1 = decode
    req      int64 [R + 1]   token offsets of requests: request r is ids[req[r]:req[r+1]]
    step     int64 [S + 1]   token offsets of forward steps (a prefill chunk, or one decode token); the
                             policy replay calls access() once per step, as the engine does
    weights  float16 [N, L, k]  optional: routing weights (after routed_scaling_factor); float16 keeps
                             ~3 significant digits and halves the file (K2: 960 B/token of ids + 960 of weights)
    tokens   int32 [N]       optional: the input token id at each position (-1 unknown)
    hints    int16 [N, L, m] optional: look-ahead predictions of each layer's experts (-1 = none)
    counts   int64 [L, E]    optional: count-only traces (SGLang stat mode) carry counts and no tokens
A truncated or edited file fails to open with TraceError naming the file; shapes are checked against the
header. Readers accept version 1 only and say so.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hybrid.core.progress import track
from hybrid.core.routing import TraceError, TraceModel  # noqa: F401 (TraceModel is part of this module's API)

FORMAT = "hybrid-routing-trace"
VERSION = 1
PREFILL, DECODE = 0, 1


@dataclass
class Trace:
    """Routing of a sequence of requests. Arrays as in the module docstring; build with record(),
    hybrid.profile.synth.synthesize(), read_trace() or the importers."""
    model: TraceModel
    ids: np.ndarray
    phase: np.ndarray
    req: np.ndarray
    step: np.ndarray
    weights: np.ndarray | None = None
    tokens: np.ndarray | None = None
    hints: np.ndarray | None = None
    counts: np.ndarray | None = None
    source: str = "engine"
    params: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_requests(self) -> int:
        return len(self.req) - 1

    @property
    def has_tokens(self) -> bool:
        return self.n_tokens > 0

    def layer_counts(self) -> np.ndarray:
        """int64 [L, E]: how often each expert was chosen in each MoE layer."""
        if self.counts is not None and not self.has_tokens:
            return self.counts.astype(np.int64)
        L, E = len(self.model.moe_layers), self.model.n_experts
        out = np.zeros((L, E), dtype=np.int64)
        for li in range(L):
            flat = self.ids[:, li, :].ravel()
            out[li] = np.bincount(flat[flat >= 0], minlength=E)[:E]
        return out

    def requests(self) -> list[dict]:
        """Per request: prompt_tokens (prefill positions) and new_tokens (decode steps)."""
        out = []
        for r in range(self.n_requests):
            ph = self.phase[self.req[r]:self.req[r + 1]]
            out.append({"prompt_tokens": int((ph == PREFILL).sum()), "new_tokens": int((ph == DECODE).sum())})
        return out

    def validate(self, source: str = "trace") -> "Trace":
        """Check shapes and ranges; raise TraceError naming what is wrong."""
        N, L, k, E = self.n_tokens, len(self.model.moe_layers), self.model.top_k, self.model.n_experts
        if self.ids.ndim != 3 or self.ids.shape[1:] != (L, k):
            raise TraceError(f"{source}: ids has shape {self.ids.shape}, expected [tokens, {L}, {k}] for "
                             f"{self.model.describe()}")
        if N and (self.ids.min() < -1 or self.ids.max() >= E):
            raise TraceError(f"{source}: expert ids span {self.ids.min()}..{self.ids.max()}, outside -1..{E - 1}")
        for name, arr, shape in (("phase", self.phase, (N,)), ("weights", self.weights, (N, L, k)),
                                 ("tokens", self.tokens, (N,))):
            if arr is not None and arr.shape != shape:
                raise TraceError(f"{source}: {name} has shape {arr.shape}, expected {shape}")
        if self.hints is not None and self.hints.shape[:2] != (N, L):
            raise TraceError(f"{source}: hints has shape {self.hints.shape}, expected [{N}, {L}, m]")
        if self.counts is not None and self.counts.shape != (L, E):
            raise TraceError(f"{source}: counts has shape {self.counts.shape}, expected [{L}, {E}]")
        for name, off in (("req", self.req), ("step", self.step)):
            if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != N or np.any(np.diff(off) < 0):
                raise TraceError(f"{source}: {name} offsets must rise from 0 to the token count {N}")
        if not set(self.req.tolist()) <= set(self.step.tolist()):
            raise TraceError(f"{source}: a forward step crosses a request boundary")
        return self


# ---- file I/O ------------------------------------------------------------------------------------------
_ARRAYS = ("ids", "phase", "req", "step", "weights", "tokens", "hints", "counts")


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write `trace` to `path` (.npz; compressed). Returns the path."""
    trace.validate()
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, "source": trace.source, "model": trace.model.to_json(),
              "n_tokens": trace.n_tokens, "requests": trace.requests(), "params": trace.params}
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    dtypes = {"ids": np.int16, "phase": np.uint8, "req": np.int64, "step": np.int64, "weights": np.float16,
              "tokens": np.int32, "hints": np.int16, "counts": np.int64}
    for name in _ARRAYS:
        arr = getattr(trace, name)
        if arr is not None:
            arrays[name] = np.ascontiguousarray(arr, dtype=dtypes[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    tmp.replace(path)      # a crash mid-write never leaves a file that looks complete
    return path


def read_trace(path: str | Path, expect=None) -> Trace:
    """Read a trace written by write_trace. `expect`: a ModelConfig or TraceModel the trace must match."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace {path} does not exist; make one with `hybrid profile record` or "
                                f"`hybrid profile synth`")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zipfile.LargeZipFile) as e:
        raise TraceError(f"{path} is not a readable trace ({type(e).__name__}: {e}); it is truncated or not a "
                         f"{FORMAT} file: record it again") from None
    if "header" not in data:
        raise TraceError(f"{path} has no header: not a {FORMAT} file")
    try:
        header = json.loads(bytes(data["header"]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"{path}: header is not valid JSON ({e}); the file is damaged") from None
    if header.get("format") != FORMAT:
        raise TraceError(f"{path}: format {header.get('format')!r} is not {FORMAT!r}")
    if header.get("version") != VERSION:
        raise TraceError(f"{path}: trace version {header.get('version')} is not supported (this build reads "
                         f"version {VERSION}); re-record it with this build")
    missing = [n for n in ("ids", "phase", "req", "step") if n not in data]
    if missing:
        raise TraceError(f"{path}: arrays {missing} are missing; the file is truncated or damaged")
    model = TraceModel.from_json(header.get("model") or {}, str(path))
    if header.get("n_tokens") != len(data["ids"]):
        raise TraceError(f"{path}: header says {header.get('n_tokens')} tokens, the file holds {len(data['ids'])}")
    t = Trace(model, data["ids"], data["phase"], data["req"], data["step"], data.get("weights"),
              data.get("tokens"), data.get("hints"), data.get("counts"), header.get("source", "?"),
              header.get("params") or {})
    t.validate(str(path))
    if expect is not None:
        model.check(expect if isinstance(expect, TraceModel) else TraceModel.from_config(expect), f"trace {path}")
    return t


# ---- recording from the engine -------------------------------------------------------------------------
class Recorder:
    """Collects an Engine's routing through add_route_listener, one request at a time.

        rec = Recorder(engine); rec.run(prompt_ids, max_new_tokens); ...; trace = rec.trace()
    Steps are delimited by the first MoE layer's call: every forward step visits each MoE layer once, in order.
    """

    def __init__(self, engine):
        self.engine = engine
        self.model = TraceModel.from_config(engine.cfg)
        self._first = self.model.moe_layers[0]
        self._steps: list[tuple[int, dict]] = []       # (phase, {layer index: (ids, weights)})
        self._req = [0]
        self._step = [0]
        self._tokens: list[int] = []
        self._chunks = ([], [], [])                     # ids, weights, phase per step

    def _listen(self, layer, ids, w, phase):
        if layer == self._first:
            self._steps.append((PREFILL if phase == "prefill" else DECODE, {}))
        self._steps[-1][1][layer] = (ids.detach().cpu().numpy(), w.detach().float().cpu().numpy())

    def run(self, prompt_ids, max_new_tokens: int, **generate_kwargs) -> list[int]:
        """Generate for one prompt, recording its routing; returns the new token ids."""
        self._steps = []
        remove = self.engine.add_route_listener(self._listen)
        try:
            new = self.engine.generate(prompt_ids, max_new_tokens, **generate_kwargs)
        finally:
            remove()
        for phase, by_layer in self._steps:
            missing = [li for li in self.model.moe_layers if li not in by_layer]
            assert not missing, f"a forward step skipped MoE layers {missing}"
            ids = np.stack([by_layer[li][0] for li in self.model.moe_layers], axis=1)
            w = np.stack([by_layer[li][1] for li in self.model.moe_layers], axis=1)
            self._chunks[0].append(ids)
            self._chunks[1].append(w)
            self._chunks[2].append(np.full(len(ids), phase, dtype=np.uint8))
            self._step.append(self._step[-1] + len(ids))
        fed = list(prompt_ids) + list(new[:-1])         # the last new token is sampled, never fed back
        self._tokens += fed[: self._step[-1] - self._req[-1]]
        self._req.append(self._step[-1])
        return new

    def trace(self, params: dict | None = None) -> Trace:
        L, k = len(self.model.moe_layers), self.model.top_k
        cat = (lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dtype=dt))
        return Trace(self.model, cat(self._chunks[0], (0, L, k), np.int64).astype(np.int16),
                     cat(self._chunks[2], (0,), np.uint8), np.array(self._req, dtype=np.int64),
                     np.array(self._step, dtype=np.int64), cat(self._chunks[1], (0, L, k), np.float32),
                     np.array(self._tokens, dtype=np.int32), source="engine", params=params or {}).validate()


def record(engine, prompts: list[list[int]], max_new_tokens: int, **generate_kwargs) -> Trace:
    """Run each prompt (token ids) through engine.generate and return the routing trace of all of them."""
    if not prompts:
        raise ValueError("no prompts to record: give at least one prompt")
    rec = Recorder(engine)
    for ids in track(prompts, "record", "prompt"):
        rec.run(ids, max_new_tokens, **generate_kwargs)
    return rec.trace({"max_new_tokens": max_new_tokens})





def from_arrays(model: TraceModel, requests: list[tuple[np.ndarray, int]], source: str, params=None,
                steps: list[list[int]] | None = None) -> Trace:
    """Build a trace from per-request ids [T, L, k] and prompt lengths: prefill is one step per request,
    each decode token its own step (unless `steps` gives each request's step lengths)."""
    ids, phase, req, step = [], [], [0], [0]
    for r, (a, n_prompt) in enumerate(requests):
        a = np.asarray(a)
        T = len(a)
        n_prompt = min(int(n_prompt), T)
        ids.append(a)
        phase.append(np.r_[np.zeros(n_prompt, np.uint8), np.ones(T - n_prompt, np.uint8)])
        lens = steps[r] if steps is not None else ([n_prompt] if n_prompt else []) + [1] * (T - n_prompt)
        for n in lens:
            step.append(step[-1] + n)
        req.append(req[-1] + T)
    L, k = len(model.moe_layers), model.top_k
    return Trace(model, np.concatenate(ids).astype(np.int16) if ids else np.zeros((0, L, k), np.int16),
                 np.concatenate(phase) if phase else np.zeros(0, np.uint8), np.array(req, np.int64),
                 np.array(step, np.int64), source=source, params=params or {}).validate(source)

