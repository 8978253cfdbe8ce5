"""Prometheus text for /metrics: requests by endpoint and status, tokens, queue depth, engine speed and
where routed experts ran (the device hot-set hit rate), from the worker's counters and the engine stats
the worker thread snapshots after each job (the engine itself is never touched from the event loop)."""
from __future__ import annotations

import collections
import threading

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
              "/v1/models", "/health", "/metrics")


class RequestCounter:
    """HTTP responses counted by (endpoint, status); unknown paths count as "other"."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def add(self, path: str, status: int) -> None:
        with self._lock:
            self.counts[(path if path in _ENDPOINTS else "other", status)] += 1

    class Middleware:
        """Pure ASGI (not BaseHTTPMiddleware, which would get between a stream and its disconnect). An
        exception that escapes the app becomes a 500 sent by Starlette's outermost layer, outside this one:
        it is counted here as the 500 it will be."""

        def __init__(self, app, counter: "RequestCounter"):
            self.app, self.counter = app, counter

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            started = False

            async def counted(message):
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    self.counter.add(scope["path"], message["status"])
                await send(message)
            try:
                await self.app(scope, receive, counted)
            except Exception:
                if not started:
                    self.counter.add(scope["path"], 500)
                raise


def _metric(lines: list, name: str, kind: str, help_: str, samples) -> None:
    lines += [f"# HELP hybrid_{name} {help_}", f"# TYPE hybrid_{name} {kind}"]
    for labels, value in samples:
        lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"hybrid_{name}{{{lab}}} {value}" if lab else f"hybrid_{name} {value}")


def prometheus_text(worker, counter: RequestCounter) -> str:
    s, c = worker.engine_stats, worker.counts
    running, waiting = worker.depth()
    act = s.expert_activations
    lines: list[str] = []
    with counter._lock:
        reqs = sorted(counter.counts.items())
    _metric(lines, "http_requests_total", "counter", "HTTP responses by endpoint and status code.",
            [({"endpoint": p, "status": st}, n) for (p, st), n in reqs])
    _metric(lines, "generations_total", "counter", "Generations by outcome.",
            [({"outcome": k}, c[k]) for k in ("finished", "cancelled", "failed")])
    _metric(lines, "prompt_tokens_total", "counter", "Prompt tokens of generations run.",
            [({}, c["prompt_tokens"])])
    _metric(lines, "completion_tokens_total", "counter", "Tokens generated.", [({}, c["completion_tokens"])])
    _metric(lines, "queue_running", "gauge", "Generations in the engine's running batch.", [({}, running)])
    _metric(lines, "queue_waiting", "gauge", "Requests waiting for a place in the batch.", [({}, waiting)])
    kv, pc = s.kv_blocks, s.prefix_cache
    _metric(lines, "kv_blocks_total", "gauge", "Blocks of the paged KV cache.", [({}, kv.total)])
    _metric(lines, "kv_blocks_in_use", "gauge", "KV blocks held by requests (cached-only ones excluded).",
            [({}, kv.in_use)])
    _metric(lines, "kv_blocks_cached", "gauge", "KV blocks nobody uses that keep a cached prefix.",
            [({}, kv.cached)])
    _metric(lines, "prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
            [({}, pc.query_tokens)])
    _metric(lines, "prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
            [({}, pc.hit_tokens)])
    _metric(lines, "tokens_per_second", "gauge", "Engine throughput since start, by phase.",
            [({"phase": "prefill"}, s.prefill_tokens_per_s), ({"phase": "decode"}, s.decode_tokens_per_s)])
    _metric(lines, "cpu_kernels_info", "gauge", "The instruction set the CPU expert kernels run (avx512, avx2 or "
            "plain: the slow portable path).", [({"isa": s.cpu_kernels}, 1)])
    _metric(lines, "expert_activations_total", "counter", "Routed-expert activations by where they ran.",
            [({"tier": t}, getattr(act, t)) for t in ("hot_set", "cpu", "device")])
    _metric(lines, "expert_hot_set_hit_rate", "gauge",
            "Share of routed-expert activations served from the device hot set.",
            [({}, act.share("hot_set"))])
    return "\n".join(lines) + "\n"
