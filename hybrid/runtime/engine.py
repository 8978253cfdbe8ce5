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
    -> final RMSNorm -> lm_head (device) -> logits float32 -> sampler (host)
Prefill runs the same layers on chunks of the prompt with MLA's expanded form, writing the cache.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from gpu_attn import MLACache

from hybrid.core.config import ModelConfig
from hybrid.runtime.model import K2Model
from hybrid.runtime.moe import MoE
from hybrid.runtime.sampler import sample


class Engine:
    def __init__(self, cfg: ModelConfig, model: K2Model, experts, tokenizer, device: torch.device,
                 dtype: torch.dtype, info: dict, prefill_chunk: int = 512):
        self.cfg, self.model, self.experts, self.tokenizer = cfg, model, experts, tokenizer
        self.device, self.dtype, self.info = device, dtype, info
        self.prefill_chunk = prefill_chunk
        self._routed = 0
        self._phase = "prefill"
        self._route_listeners: list[Callable] = []
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.on_route = self._count_route
        self.reset_stats()

    # ---- public ----------------------------------------------------------------------------------
    def forward(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits [len(ids), vocab] float32 (on the host) of a fresh sequence, prefill form, no cache."""
        x = self._check_ids(ids, 0)
        self._set_phase("prefill")
        try:
            with torch.inference_mode():
                return self.model.logits(self.model.hidden(x)).cpu()
        finally:
            self._end_request()

    def generate(self, ids: Sequence[int] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """New token ids (the prompt excluded), decoded with the compressed KV cache.

        Stops after max_new_tokens, at a stop id (default: the config's eos and, when a tokenizer is
        present, its stop tokens such as <|im_end|>; a stop id is included in the result), or when
        on_token(tok) returns False (that token is included).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature} and {top_p}")
        x = self._check_ids(ids, max_new_tokens)
        stop = set(self.default_stop_ids() if stop_ids is None else stop_ids)
        gen = torch.Generator()
        gen.manual_seed(seed) if seed is not None else gen.seed()
        cache = MLACache(self.cfg.num_hidden_layers, len(x) + max_new_tokens, self.cfg.kv_lora_rank,
                         self.cfg.qk_rope_head_dim, self.dtype, self.device)
        out: list[int] = []
        try:
            self._decode_loop(x, out, cache, max_new_tokens, temperature, top_p, gen, stop, on_token)
        finally:
            self._end_request()      # per-request policy state must not leak into the next request
        return out

    def _decode_loop(self, x, out, cache, max_new_tokens, temperature, top_p, gen, stop, on_token) -> None:
        with torch.inference_mode():
            t0 = time.perf_counter()
            self._set_phase("prefill")
            for start in range(0, len(x), self.prefill_chunk):
                h = self.model.hidden(x[start:start + self.prefill_chunk], start, cache)
            logits = self.model.logits(h[-1:])[0]
            self._time("prefill", len(x), t0)
            pos = len(x)
            t0 = time.perf_counter()
            self._set_phase("decode")
            while len(out) < max_new_tokens:
                tok = sample(logits, temperature, top_p, gen)
                out.append(tok)
                if on_token is not None and on_token(tok) is False:
                    break        # the caller (e.g. a server whose client left, or a stop string) ends it
                if tok in stop or len(out) == max_new_tokens:
                    break
                h = self.model.hidden(torch.tensor([tok], device=self.device), pos, cache, absorbed=True)
                logits = self.model.logits(h)[0]
                pos += 1
            self._time("decode", len(out), t0)

    def default_stop_ids(self) -> tuple[int, ...]:
        ids = set(self.cfg.eos_ids)
        if self.tokenizer is not None:
            ids.update(self.tokenizer.stop_ids)
        return tuple(sorted(ids))

    def stats(self) -> dict:
        s = dict(self._stats)
        s["prefill_tokens_per_s"] = _rate(s["prefill_tokens"], s["prefill_seconds"])
        s["decode_tokens_per_s"] = _rate(s["decode_tokens"], s["decode_seconds"])
        backend = self.experts.stats()
        act = {"hot_set": 0, "cpu": 0, "device": 0, "total": self._routed}
        if "hot_set" in backend:      # HybridExperts splits activations itself
            act["hot_set"], act["cpu"] = int(backend["hot_set"]), int(backend["cpu"])
        else:
            act[self.info.get("experts_tier", "cpu")] = self._routed
        s["expert_activations"] = act
        s["experts"] = self.info.get("experts")
        s["device"] = str(self.device)
        s["expert_backend"] = backend
        return s

    def add_route_listener(self, fn: Callable[[int, torch.Tensor, torch.Tensor, str], None]) -> Callable[[], None]:
        """Call fn(layer, topk_ids [T, k], topk_weights [T, k], phase) for every MoE layer's routing, where
        phase is "prefill" or "decode" (profiling, tracing). Returns a function that removes it."""
        self._route_listeners.append(fn)
        return lambda: self._route_listeners.remove(fn)

    @property
    def plan(self):
        """The PlacementPlan this engine was loaded with."""
        return self.info.get("plan")

    def reset_stats(self) -> None:
        if hasattr(self.experts, "reset_stats"):
            self.experts.reset_stats()
        self._stats = {"prefill_tokens": 0, "prefill_seconds": 0.0, "decode_tokens": 0, "decode_seconds": 0.0}
        self._routed = 0

    # ---- internals -------------------------------------------------------------------------------
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

    def _set_phase(self, phase: str) -> None:
        self._phase = phase
        if hasattr(self.experts, "set_phase"):
            self.experts.set_phase(phase)

    def _end_request(self) -> None:
        if hasattr(self.experts, "end_request"):
            self.experts.end_request()

    def _count_route(self, layer, ids, w) -> None:
        self._routed += ids.numel()          # the router fills every slot (no -1); numel needs no device sync
        for fn in self._route_listeners:
            fn(layer, ids, w, self._phase)

    def _time(self, phase: str, n: int, t0: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._stats[f"{phase}_tokens"] += n
        self._stats[f"{phase}_seconds"] += time.perf_counter() - t0


def _rate(n: int, s: float) -> float:
    return n / s if s > 0 else 0.0
