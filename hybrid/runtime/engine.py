"""The engine: forward, generate and stats over an assembled model.

One decode step (where each tensor lives; "device" is CUDA, or the CPU standing in for it):
    ids (host) -> embed (device) -> for each layer:
        RMSNorm -> MLA over the compressed cache (device; absorbed form, 576 values/token/layer for K2)
        -> +residual -> RMSNorm -> h (device)
        dense layer: SwiGLU MLP(h) on the device
        MoE layer:   router(h) on the device -> top-k ids + weights (scaled by routed_scaling_factor)
                     submit routed experts: h, ids, weights copied to host -> CPU kernels (background)
                     meanwhile the shared expert runs on the device
                     wait -> routed sum copied back to the device -> + shared -> +residual
    -> final RMSNorm -> lm_head (device) -> logits float32 -> Sampler (host)
Prefill runs the same layers on chunks of the prompt with MLA's expanded form, writing the cache.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gpu_attn import MLACache
from hybrid.core.config import ModelConfig
from hybrid.core.placement import PlacementPlan
from hybrid.core.sampling import SamplingParams
from hybrid.runtime.experts import ExpertBackend
from hybrid.runtime.model import K2Model, Step
from hybrid.runtime.moe import RouteListeners, RouteObserver
from hybrid.runtime.sampler import LogitsProcessor, Sampler, TokenSample


@dataclass(frozen=True)
class LoadInfo:
    """What hybrid.load decided, for stats and for the caller."""
    model_dir: Path
    experts: str            # routed-expert format: int4 | fp8 | bf16 | torch
    threads: int
    plan: PlacementPlan


@dataclass
class PhaseTimes:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0


class Engine:
    def __init__(self, cfg: ModelConfig, model: K2Model, experts: ExpertBackend, tokenizer, device: torch.device,
                 dtype: torch.dtype, info: LoadInfo, routes: RouteListeners, prefill_chunk: int = 512):
        """model was built with `experts` as its backend and `routes` as its routing observer."""
        self.cfg, self.model, self.experts, self.tokenizer = cfg, model, experts, tokenizer
        self.device, self.dtype, self.info = device, dtype, info
        self.routes = routes
        self.prefill_chunk = prefill_chunk
        self.reset_stats()

    # ---- public ----------------------------------------------------------------------------------
    def forward(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits [len(ids), vocab] float32 (on the host) of a fresh sequence, prefill form, no cache."""
        x = self._check_ids(ids, 0)
        try:
            with torch.inference_mode():
                return self.model.logits(self.model.hidden(x, Step("prefill"))).cpu()
        finally:
            self.experts.end_request()

    def generate(self, ids: Sequence[int] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] | None = None,
                 on_token: Callable[[int], bool | None] | None = None, *, sampling: SamplingParams | None = None,
                 processors: Sequence[LogitsProcessor] = (),
                 on_sample: Callable[[TokenSample], bool | None] | None = None) -> list[int]:
        """New token ids (the prompt excluded), decoded with the compressed KV cache.

        Sampling: `sampling` (SamplingParams: penalties, logprobs, ...) or the temperature/top_p/seed
        shorthand; `processors` change the logits before each choice (e.g. a grammar mask).
        Stops after max_new_tokens, at a stop id (default: the config's eos and, when a tokenizer is
        present, its stop tokens such as <|im_end|>; a stop id is included in the result), or when
        on_token(token) or on_sample(TokenSample) returns False (that token is included).
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        sampler = Sampler(sampling or SamplingParams(temperature=temperature, top_p=top_p, seed=seed), processors)
        x = self._check_ids(ids, max_new_tokens)
        stop = set(self.default_stop_ids() if stop_ids is None else stop_ids)

        def emit(s: TokenSample) -> bool:
            keep = (on_token is None or on_token(s.token) is not False)
            return (on_sample is None or on_sample(s) is not False) and keep

        cache = MLACache(self.cfg.num_hidden_layers, len(x) + max_new_tokens, self.cfg.kv_lora_rank,
                         self.cfg.qk_rope_head_dim, self.dtype, self.device)
        out: list[int] = []
        try:
            with torch.inference_mode():
                logits = self._prefill(x, cache)
                self._decode(logits, len(x), cache, sampler, max_new_tokens, stop, emit, out)
        finally:
            self.experts.end_request()      # per-request policy state must not leak into the next request
        return out

    def default_stop_ids(self) -> tuple[int, ...]:
        ids = set(self.cfg.eos_ids)
        if self.tokenizer is not None:
            ids.update(self.tokenizer.stop_ids)
        return tuple(sorted(ids))

    def stats(self) -> dict:
        """Tokens and seconds per phase, tokens/s, routed-expert activations by tier, the backend's counters."""
        t = self.times
        backend = self.experts.stats()
        served = backend.served
        return {**asdict(t),
                "prefill_tokens_per_s": _rate(t.prefill_tokens, t.prefill_seconds),
                "decode_tokens_per_s": _rate(t.decode_tokens, t.decode_seconds),
                "expert_activations": {"hot_set": served.hot_set, "cpu": served.cpu, "device": served.device,
                                       "total": served.total},
                "experts": self.info.experts, "device": str(self.device), "expert_backend": asdict(backend)}

    def add_route_listener(self, fn: RouteObserver) -> Callable[[], None]:
        """Call fn(layer, topk_ids [T, k], topk_weights [T, k], phase) for every MoE layer's routing, where
        phase is "prefill" or "decode" (profiling, tracing). Returns a function that removes it."""
        return self.routes.add(fn)

    @property
    def plan(self) -> PlacementPlan:
        """The PlacementPlan this engine was loaded with."""
        return self.info.plan

    def reset_stats(self) -> None:
        self.experts.reset_stats()
        self.times = PhaseTimes()

    # ---- internals -------------------------------------------------------------------------------
    def _prefill(self, x: torch.Tensor, cache: MLACache) -> torch.Tensor:
        """Run the prompt through the cache in chunks; logits [V] of its last token."""
        t0 = time.perf_counter()
        for start in range(0, len(x), self.prefill_chunk):
            h = self.model.hidden(x[start:start + self.prefill_chunk], Step("prefill", start, cache))
        logits = self.model.logits(h[-1:])[0]
        self._time("prefill", len(x), t0)
        return logits

    def _decode(self, logits, pos: int, cache, sampler: Sampler, max_new: int, stop: set, emit, out: list) -> None:
        t0 = time.perf_counter()
        while len(out) < max_new:
            s = sampler(logits)
            out.append(s.token)
            if emit(s) is False or s.token in stop or len(out) == max_new:
                break        # the caller (e.g. a server whose client left, or a stop string) may end it
            h = self.model.hidden(torch.tensor([s.token], device=self.device), Step("decode", pos, cache, absorbed=True))
            logits = self.model.logits(h)[0]
            pos += 1
        self._time("decode", len(out), t0)

    def _check_ids(self, ids, max_new_tokens: int) -> torch.Tensor:
        x = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long).flatten()
        if x.numel() == 0:
            raise ValueError("the prompt is empty: give at least one token id")
        V = self.cfg.vocab_size
        if int(x.min()) < 0 or int(x.max()) >= V:
            bad = int(x.min()) if int(x.min()) < 0 else int(x.max())
            raise ValueError(f"token id {bad} is outside this model's vocabulary [0, {V})")
        limit = self.cfg.max_position_embeddings
        if x.numel() + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {x.numel()} tokens plus max_new_tokens {max_new_tokens} exceeds the context of "
                f"{limit} tokens (max_position_embeddings); shorten the prompt or lower max_new_tokens")
        return x.to(self.device)

    def _time(self, phase: str, n: int, t0: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = self.times
        if phase == "prefill":
            t.prefill_tokens += n
            t.prefill_seconds += time.perf_counter() - t0
        else:
            t.decode_tokens += n
            t.decode_seconds += time.perf_counter() - t0


def _rate(n: int, s: float) -> float:
    return n / s if s > 0 else 0.0
