"""One engine, many clients: a FIFO of generation jobs served by a single worker thread.

The engine is not thread-safe and holds one KV cache, so exactly one generation runs at a time; the
others wait in arrival order (fair: first come, first served). A full queue is refused (QueueFull -> 503)
instead of growing without bound. Cancelling a job (client gone) removes it from the queue at once, or,
if it is running, makes its next on_sample return False, which ends engine.generate after that token.

A Job carries everything the engine call needs: the prompt ids, the budget, its SamplingParams, its own
logits processors (a grammar mask, top-k: fresh per job, they hold per-request state) and its stop ids;
the engine is called in one place, Worker._run.

Per-token text work (UTF-8 assembly, stop strings, tool-call parsing) runs on the worker thread inside
on_sample, so a stop string ends generation on the very token that completes it. Its results travel to
the asyncio loop that submitted the job through an asyncio.Queue (call_soon_threadsafe), as events:
    ("delta", [ToolCallStream events], [TokenSample])   text that may be sent now, and the samples of the
                                                         tokens since the last delta (logprobs asked for)
    ("end", Result)                        the job finished (not sent for a cancelled job)
    ("error", exception)                   engine.generate raised
    ("gone", None)                         put by the server itself when the client disconnected
    ("shutdown", None)                     put by the server itself when it stops before the job ends
"""
from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from dataclasses import dataclass, field

from hybrid.core.sampling import SamplingParams
from hybrid.runtime.sampler import LogitsProcessor, TokenSample
from hybrid.serve.streaming import StopMatcher, ToolCallStream
from hybrid.text.chat import parse_tool_calls

# Every Job ever made, while alive: tests check that finished requests leave nothing behind.
LIVE_JOBS: "weakref.WeakSet[Job]" = weakref.WeakSet()


class QueueFull(Exception):
    pass


@dataclass
class Result:
    finish_reason: str            # "stop" | "length" | "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    text: str                     # all text after stop-string trimming (tool-call markers included)
    content: str                  # text before the tool-call section (== text when tools are not parsed)
    tool_calls: list[dict] = field(default_factory=list)
    stop_sequence: str | None = None                          # the stop string that ended it, if one did
    samples: list[TokenSample] = field(default_factory=list)  # every token's but the stop token's (logprobs)


class _Output:
    """Generated ids -> events: UTF-8 assembly, then stop strings, then (chat with tools) tool calls."""

    def __init__(self, tokenizer, stops, parse_tools: bool):
        self.decoder = tokenizer.stream(skip_special=True)
        self.stopper = StopMatcher(stops)
        self.tools = ToolCallStream() if parse_tools else None
        self.pieces: list[str] = []

    def push(self, token: int) -> list[tuple]:
        return self._route(self.stopper.push(self.decoder.push(token)))

    def finish(self) -> list[tuple]:
        tail = "" if self.stopper.stopped else self.stopper.push(self.decoder.flush())
        events = self._route(tail + self.stopper.finish())
        return events + (self.tools.finish() if self.tools else [])

    def _route(self, text: str) -> list[tuple]:
        if not text:
            return []
        self.pieces.append(text)
        return self.tools.push(text) if self.tools else [("content", text)]


class Job:
    """One generation (one choice of a request). Made on the event loop; on_sample/finish/fail run on the
    worker thread.

    Args:
        params: how tokens are chosen (penalties, seed, logprobs ...).
        stops: stop strings (the text ends before the first one).
        processors: this job's own logits processors, applied in order before each choice.
        index: the choice this job answers (n > 1).
    """

    def __init__(self, ids: list[int], max_new_tokens: int, params: SamplingParams, stops: tuple[str, ...],
                 stop_ids, tokenizer, parse_tools: bool, loop: asyncio.AbstractEventLoop,
                 processors: tuple[LogitsProcessor, ...] = (), index: int = 0):
        self.ids, self.max_new_tokens, self.params = ids, max_new_tokens, params
        self.stop_ids, self.parse_tools = tuple(stop_ids), parse_tools
        self.processors, self.index = tuple(processors), index
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._loop = loop
        self._out = _Output(tokenizer, stops, parse_tools)
        self._pending: list[TokenSample] = []     # samples whose text is not out yet
        self._delivered: list[TokenSample] = []
        LIVE_JOBS.add(self)

    def on_sample(self, s: TokenSample) -> bool:
        if self.cancelled.is_set():
            return False
        if self.params.logprobs is not None and s.token not in self.stop_ids:
            self._pending.append(s)
        events = self._out.push(s.token)
        if events:
            self._post(("delta", events, self._take_samples()))
        return not (self._out.stopper.stopped or self.cancelled.is_set())

    def _take_samples(self) -> list[TokenSample]:
        taken, self._pending = self._pending, []
        self._delivered += taken
        return taken

    def finish(self, out: list[int]) -> None:
        events, samples = self._out.finish(), self._take_samples()
        if events or samples:         # samples of tokens without text of their own (specials) go out too
            self._post(("delta", events, samples))
        text = "".join(self._out.pieces)
        content, calls = parse_tool_calls(text) if self.parse_tools else (text, [])
        if self._out.stopper.stopped or (out and out[-1] in self.stop_ids):
            reason = "stop"
        else:
            reason = "length" if len(out) >= self.max_new_tokens else "stop"
        if calls:
            reason = "tool_calls"     # as vLLM: a parsed call wins, so the client runs it
        self._post(("end", Result(reason, len(self.ids), len(out), text, content, calls,
                                  self._out.stopper.matched, self._delivered)))

    def fail(self, exc: Exception) -> None:
        self._post(("error", exc))

    def _post(self, event) -> None:
        if self.cancelled.is_set():
            return
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:          # the loop is closed: nobody is listening any more
            self.cancelled.set()


class Worker:
    """Runs queued Jobs one at a time on engine.generate, in a daemon thread (start() / close())."""

    def __init__(self, engine, max_queue: int):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0 (waiting requests), got {max_queue!r}")
        self.engine, self.max_queue = engine, max_queue
        self.running: Job | None = None
        self.counts = collections.Counter()      # finished, cancelled, failed, prompt/completion tokens
        self.engine_stats: dict = engine.stats()  # refreshed by the worker thread after each job
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="hybrid-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, *jobs: Job) -> None:
        """Queue jobs (all or none: the choices of one request); QueueFull when they do not fit."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            busy = len(self._waiting) + (self.running is not None)
            if busy + len(jobs) - 1 > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting and {int(self.running is not None)} "
                                f"is running (--max-queue {self.max_queue})")
            self._waiting.extend(jobs)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job from the queue, or stop it at its next token."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.counts["cancelled"] += 1

    def depth(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._cond:
            return int(self.running is not None), len(self._waiting)

    def stop_accepting(self) -> list[Job]:
        """Shutdown begins: refuse new jobs; the waiting ones are dropped and returned (the running one
        goes on)."""
        with self._cond:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self.counts["cancelled"] += len(dropped)
        for job in dropped:
            job.cancelled.set()
        return dropped

    def in_flight(self) -> list[Job]:
        """The jobs generating now."""
        with self._cond:
            return [self.running] if self.running is not None else []

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            for job in [*self._waiting, *([self.running] if self.running else [])]:
                job.cancelled.set()
            self._waiting.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self.running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None
                del job               # an idle worker holds no request's buffers

    def _run(self, job: Job) -> None:
        try:
            out = self.engine.generate(job.ids, job.max_new_tokens, stop_ids=job.stop_ids, sampling=job.params,
                                       processors=job.processors, on_sample=job.on_sample)
            cancelled = job.cancelled.is_set()
            if not cancelled:
                job.finish(out)
            self.counts.update({"cancelled" if cancelled else "finished": 1, "prompt_tokens": len(job.ids),
                                "completion_tokens": len(out)})
        except Exception as e:        # reported to this request's client; the server keeps serving
            self.counts["failed"] += 1
            job.fail(e)
        try:
            self.engine_stats = self.engine.stats()
        except Exception:             # metrics must never take the worker down
            pass
