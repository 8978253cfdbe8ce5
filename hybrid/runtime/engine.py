"""The engine: requests in, batched forward steps, tokens out.

One step (where each tensor lives; "device" is CUDA, or the CPU standing in for it):
    scheduler (host): running sequences' next tokens + prompt chunks of admitted ones -> Batch
    ids (host -> device) -> embed -> for each layer:
        RMSNorm -> MLA: q and this step's cache rows for every token; the rows go into each sequence's
                   blocks of the paged compressed cache (576 values/token/layer for K2); every sequence
                   attends over its own rows (absorbed form for one new token, expanded for a chunk)
        -> +residual -> RMSNorm -> h [T, H] (device)
        dense layer: SwiGLU MLP(h) on the device
        MoE layer:   router(h) on the device -> top-k ids + weights (scaled by routed_scaling_factor)
                     submit routed experts for ALL the step's tokens: h, ids, weights copied to host -> CPU
                     kernels (background; each chosen expert read once for every token that chose it)
                     meanwhile the shared expert runs on the device
                     wait -> routed sum copied back to the device -> + shared -> +residual
    -> final RMSNorm -> lm_head on the last row of each sequence whose tokens are all computed
    -> logits float32 -> each request's Sampler (host) -> its callback; finished sequences free their blocks
A request alone is the same path with a batch of one. With a device map (hybrid/runtime/device_map.py) the layers
run on their own devices in turn: the hidden state [T, H] is copied to the next device at each boundary, each
device reads and writes its own layers' KV pool (block ids shared), and the logits come from the last device.

    eng.generate(ids, 16)                              # one request, blocking
    eng.generate_many([Request(ids_a, 16), Request(ids_b, 32)])   # several at once, batched
    seq = eng.submit(Request(...)); while eng.busy: eng.step()    # the server's loop
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from cpu_experts.paths import active_isa
from hybrid.core.config import ModelConfig
from hybrid.core.errors import NonFiniteOutput
from hybrid.core.placement import PlacementPlan
from hybrid.core.sampling import SamplingParams
from hybrid.runtime.batch import build_batch
from hybrid.runtime.blocks import BlockManager
from hybrid.runtime.device_map import KVPools, device_stats
from hybrid.runtime.experts import ExpertBackend, ExpertStats
from hybrid.runtime.model import K2Model
from hybrid.runtime.moe import RouteListeners, RouteObserver
from hybrid.runtime.sampler import LogitsProcessor, Sampler, TokenSample
from hybrid.runtime.scheduler import FINISHED, Scheduler, Sequence
from hybrid.runtime.stats import EngineStats, ExpertActivations, KVBlocks, SchedulerState


@dataclass(frozen=True)
class LoadInfo:
    """What hybrid.load decided, for stats and for the caller."""
    model_dir: Path
    experts: str            # routed-expert format: int4 | fp8 | bf16 | torch
    dense: str              # dense linears: torch (float modules) | auto | int4 | fp8 | bf16 (packed)
    threads: int
    plan: PlacementPlan


@dataclass(frozen=True)
class BatchConfig:
    """How many sequences and tokens a step may carry, and how the KV cache is cut."""
    max_batch: int = 8                # sequences per step
    max_batch_tokens: int = 512       # tokens per step (decode tokens + prompt chunks): the prefill chunk
    block_size: int = 32              # tokens per KV block
    n_blocks: int = 1024              # blocks in the pool (the plan's context / block_size)
    prefix_cache: bool = True


@dataclass(frozen=True)
class Request:
    """One generation. on_sample(TokenSample) returning False ends it after that token (a client left, a
    stop string matched). stop_ids None = the engine's default stop ids."""
    ids: Seq[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: Seq[int] | None = None
    processors: tuple[LogitsProcessor, ...] = ()
    on_sample: Callable[[TokenSample], bool | None] | None = None


@dataclass
class _Active:
    """The engine's part of a running sequence."""
    request: Request
    sampler: Sampler
    stop: frozenset[int]
    finish_reason: str | None = None      # "stop" | "length" | "cancelled" | "error"
    error: Exception | None = None        # what ended it with "error" (its sampler or a processor raised)


@dataclass
class PhaseTimes:
    """Steps are timed whole: a step with any prompt tokens counts as prefill, one of only new tokens as
    decode. prefill_tokens = prompt tokens computed; decode_tokens = tokens sampled in decode steps (each
    request's first token comes from its last prefill step)."""
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    generated_tokens: int = 0
    steps: int = 0


class Engine:
    def __init__(self, cfg: ModelConfig, model: K2Model, experts: ExpertBackend, tokenizer, device: torch.device,
                 dtype: torch.dtype, info: LoadInfo, routes: RouteListeners, batching: BatchConfig = BatchConfig()):
        """model was built with `experts` as its backend and `routes` as its routing observer."""
        self.cfg, self.model, self.experts, self.tokenizer = cfg, model, experts, tokenizer
        self.device, self.dtype, self.info, self.routes, self.batching = device, dtype, info, routes, batching
        self.dense_packed = info.dense != "torch"
        self.kv = KVPools(model.devices, batching.n_blocks, batching.block_size, cfg.kv_cache_dim, dtype)
        self.blocks = BlockManager(batching.n_blocks, batching.block_size, batching.prefix_cache)
        self.scheduler = Scheduler(self.blocks, batching.max_batch, batching.max_batch_tokens)
        self._next_id = 0
        self.reset_stats()

    # ---- requests ---------------------------------------------------------------------------------------
    def generate(self, ids: Seq[int] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids: Seq[int] | None = None,
                 on_token: Callable[[int], bool | None] | None = None, *, sampling: SamplingParams | None = None,
                 processors: Seq[LogitsProcessor] = (),
                 on_sample: Callable[[TokenSample], bool | None] | None = None) -> list[int]:
        """New token ids (the prompt excluded) of one request.

        Sampling: `sampling` (SamplingParams: penalties, logprobs, ...) or the temperature/top_p/seed
        shorthand; `processors` change the logits before each choice (e.g. a grammar mask).
        Stops after max_new_tokens, at a stop id (default: the config's eos and, when a tokenizer is
        present, its stop tokens such as <|im_end|>; a stop id is included in the result), or when
        on_token(token) or on_sample(TokenSample) returns False (that token is included).
        """
        def emit(s: TokenSample) -> bool:
            keep = on_token is None or on_token(s.token) is not False
            return (on_sample is None or on_sample(s) is not False) and keep
        req = Request(_as_list(ids), max_new_tokens, sampling or SamplingParams(temperature, top_p, seed),
                      stop_ids, tuple(processors), emit)
        return self.generate_many([req])[0]

    def generate_many(self, requests: Seq[Request]) -> list[list[int]]:
        """Run several requests together (continuous batching); their new token ids, in order."""
        seqs = [self.submit(r) for r in requests]
        try:
            while any(s.status != FINISHED for s in seqs):
                self.step()
        finally:
            for s in seqs:
                if s.status != FINISHED:       # an error in a step: free what they hold
                    self.cancel(s)
            self.scheduler.drop_cancelled()
        for s in seqs:
            if s.payload.error is not None:
                raise s.payload.error
        return [self.output(s) for s in seqs]

    def output(self, seq: Sequence) -> list[int]:
        """The new token ids of a submitted request (so far)."""
        return seq.tokens[seq.prompt_len:]

    def outcome(self, seq: Sequence) -> tuple[str | None, Exception | None]:
        """(finish reason, error) of a request: None while it runs; "stop" | "length" | "cancelled" | "error"."""
        return seq.payload.finish_reason, seq.payload.error

    def cached_tokens(self, seq: Sequence) -> int:
        """Prompt tokens of a request served by the prefix cache (OpenAI's usage.prompt_tokens_details)."""
        return seq.cached_tokens

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @property
    def max_context(self) -> int:
        """Tokens one request may reach (prompt + new): the model's context, or the KV pool if smaller."""
        return min(self.cfg.max_position_embeddings, self.blocks.n_blocks * self.blocks.block_size)

    def submit(self, request: Request) -> Sequence:
        """Queue a request; step() runs it. Checked now: ids, lengths, sampling (errors name the value)."""
        ids = self._check_ids(request.ids, request.max_new_tokens).tolist()
        stop = frozenset(self.default_stop_ids() if request.stop_ids is None else request.stop_ids)
        act = _Active(request, Sampler(request.sampling, request.processors), stop)
        seq = Sequence(self._next_id, len(ids), ids, len(ids) + request.max_new_tokens, act)
        self._next_id += 1
        if request.max_new_tokens == 0:
            seq.status, act.finish_reason = FINISHED, "length"
            return seq
        self.scheduler.add(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End a request at the next step (its blocks are freed then)."""
        if seq.status != FINISHED:
            self.scheduler.cancel(seq)
            seq.payload.finish_reason = "cancelled"

    @property
    def busy(self) -> bool:
        return not self.scheduler.idle

    def step(self) -> list[Sequence]:
        """One forward step over what the scheduler picks; returns the sequences that finished in it."""
        work = self.scheduler.schedule()
        if not work:
            self._idle()
            return []
        t0 = time.perf_counter()
        batch = build_batch(work, self.blocks.block_size, self.device)
        self._threads_for(batch.phase)
        with torch.inference_mode():
            h = self.model.hidden(batch, self.kv)
            ready = [(seq, seg) for (seq, n), seg in zip(work, batch.segments) if seq.to_compute == n]
            rows = torch.tensor([seg.start + seg.length - 1 for _, seg in ready], dtype=torch.long, device=h.device)
            logits = self.model.logits(h.index_select(0, rows)).cpu() if ready else None
        prompt = sum(max(0, min(seq.n_computed + n, seq.prompt_len) - seq.n_computed) for seq, n in work)
        for seq, n in work:
            self.scheduler.computed(seq, n)
        done = [seq for i, (seq, _) in enumerate(ready) if self._sample_or_fail(seq, logits[i])]
        self._time(batch.phase, prompt, len(ready), t0)
        if self.scheduler.idle:
            self._idle()
        return done

    # ---- one-pass logits ----------------------------------------------------------------------------------
    def forward(self, ids: Seq[int] | torch.Tensor) -> torch.Tensor:
        """Logits [len(ids), vocab] float32 (on the host) of a fresh sequence: one step, expanded form, through
        blocks of the pool that are freed again (no prefix cache)."""
        x = self._check_ids(ids, 0).tolist()
        seq = Sequence(-1, len(x), x, len(x))
        if not self.blocks.grow(seq.table, len(x)):
            raise ValueError(f"forward() of {len(x)} tokens needs {self.blocks.blocks_for(len(x))} KV blocks but "
                             f"{self.blocks.available} are free; finish running requests or raise --context")
        try:
            batch = build_batch([(seq, len(x))], self.blocks.block_size, self.device, absorbed=False)
            with torch.inference_mode():
                return self.model.logits(self.model.hidden(batch, self.kv)).cpu()
        finally:
            self.blocks.release(seq.table)
            if self.scheduler.idle:
                self._idle()

    # ---- stats --------------------------------------------------------------------------------------------
    def default_stop_ids(self) -> tuple[int, ...]:
        ids = set(self.cfg.eos_ids)
        if self.tokenizer is not None:
            ids.update(self.tokenizer.stop_ids)
        return tuple(sorted(ids))

    def stats(self) -> EngineStats:
        """Tokens and seconds per phase, tokens/s, routed-expert activations by tier, the backend's counters,
        the scheduler's and the prefix cache's, and per device of the map its layers, KV bytes and hot-set hits
        (EngineStats; .to_dict() for JSON)."""
        t, backend, sched = self.times, self.experts.stats(), self.scheduler
        return EngineStats(
            **asdict(t), prefill_tokens_per_s=_rate(t.prefill_tokens, t.prefill_seconds),
            decode_tokens_per_s=_rate(t.decode_tokens, t.decode_seconds),
            expert_activations=ExpertActivations.of(backend.served), experts=self.info.experts,
            dense=self.info.dense, device=self.info.plan.device, cpu_kernels=_kernels_in_use(backend),
            expert_backend=backend,
            scheduler=SchedulerState(**asdict(sched.stats), running=len(sched.running), waiting=len(sched.waiting)),
            kv_blocks=KVBlocks(self.blocks.n_blocks, self.blocks.in_use, len(self.blocks.idle), self.blocks.block_size),
            prefix_cache=replace(self.blocks.stats), devices=device_stats(self.model.devices, self.kv, backend))

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

    # ---- internals --------------------------------------------------------------------------------------
    def _sample_or_fail(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """_sample; an error of this request's own sampling (a processor raised) ends this request only."""
        try:
            return self._sample(seq, logits)
        except Exception as e:
            seq.payload.finish_reason, seq.payload.error = "error", e
            if seq.status != FINISHED:
                self.scheduler.finish(seq)
            return True

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Choose seq's next token, tell its caller; True when the request is over (then it is finished)."""
        act: _Active = seq.payload
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteOutput(
                f"the model computed non-finite logits (NaN or inf) after {seq.n_generated} generated token(s): "
                f"its weights hold NaN or inf values; check the model with `hybrid-quant verify STORE --against "
                f"SOURCE` (a converted store) or re-download the shards")
        s = act.sampler(logits)
        seq.tokens.append(s.token)
        self.times.generated_tokens += 1
        keep = act.request.on_sample is None or act.request.on_sample(s) is not False
        if not keep:
            act.finish_reason = "cancelled"
        elif s.token in act.stop:
            act.finish_reason = "stop"
        elif seq.n_generated >= act.request.max_new_tokens:
            act.finish_reason = "length"
        else:
            return False
        self.scheduler.finish(seq)
        return True

    def _threads_for(self, phase: str) -> None:
        """On a CPU device whose dense layers run on the kernels' pool, torch keeps one thread while decoding:
        what is left to it are small ops (norms, RoPE, attention over one token), for which waking a second
        OpenMP thread costs more than it saves, and its spinning threads would compete with the pool's (a decode
        step of the tiny model: 1.6-2.4 ms with one torch thread against 6.6-8.1 ms with two, shared machine).
        Prefill gives torch all threads for attention over the chunk."""
        if self.device.type == "cpu" and self.dense_packed:
            torch.set_num_threads(1 if phase == "decode" else self.info.threads)

    def _idle(self) -> None:
        """Nothing runs: per-request state in the backend (a policy's scores) starts over."""
        self.experts.end_request()

    def _check_ids(self, ids, max_new_tokens: int) -> torch.Tensor:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        x = torch.as_tensor(_as_list(ids), dtype=torch.long).flatten()
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
        return x

    def _time(self, phase: str, prompt_tokens: int, sampled: int, t0: float) -> None:
        if self.device.type == "cuda":
            for d in dict.fromkeys(s.device for s in self.model.devices.spans):   # hot-set copies included
                torch.cuda.synchronize(d)
        t, dt = self.times, time.perf_counter() - t0
        t.steps += 1
        if phase == "prefill":
            t.prefill_tokens += prompt_tokens
            t.prefill_seconds += dt
        else:
            t.decode_tokens += sampled
            t.decode_seconds += dt


def _as_list(ids) -> list[int]:
    return ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _kernels_in_use(backend: ExpertStats) -> str:
    """The CPU kernels' instruction set (avx512 | avx2), or plain when every layer of the CPU experts runs the
    portable kernels (their sizes are not multiples of the fast kernels' unit, as in the tiny models)."""
    cpu = backend.cpu
    return "plain" if cpu is not None and cpu.paths and set(cpu.paths) == {"plain"} else active_isa()


def _rate(n: int, s: float) -> float:
    return n / s if s > 0 else 0.0
