"""One engine, many clients: jobs run together through the engine's continuous batching, on one thread.

The engine is not thread-safe, so one worker thread owns it: between forward steps it hands new jobs to
the engine, passes on cancellations and reports finished jobs; the engine's scheduler runs up to
--max-batch of them in each step (decode tokens of running requests plus prompt chunks of new ones, first
come first served) and keeps the rest waiting. A full queue is refused (QueueFull -> 503) instead of
growing without bound. Cancelling a job (client gone) removes it from the queue at once, or, if it is in
the engine, ends it at the next step and frees its KV blocks.

A Job carries everything the engine call needs: the prompt ids, the budget, its SamplingParams, its own
logits processors (a grammar mask, top-k: fresh per job, they hold per-request state) and its stop ids;
the engine gets it in one place, Worker._admit.

Per-token text work (UTF-8 assembly, stop strings, tool-call parsing) runs on the worker thread inside
on_sample, so a stop string ends generation on the very token that completes it. Its results travel to
the asyncio loop that submitted the job through an asyncio.Queue (call_soon_threadsafe), as JobEvents:
    Delta(pieces, samples)   text that may be sent now (streaming.Piece), and the samples of the tokens since
                             the last delta (logprobs asked for)
    End(result)              the job finished (not sent for a cancelled job)
    Failed(error)            the engine refused or failed the job
    Gone()                   put by the server itself when the client disconnected
    Shutdown()               put by the server itself when it stops before the job ends
"""
from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from hybrid.core.sampling import SamplingParams
from hybrid.runtime.sampler import LogitsProcessor, TokenSample
from hybrid.serve.streaming import Content, Piece, StopMatcher, ToolCallStream
from hybrid.text.chat import parse_tool_calls

if TYPE_CHECKING:                   # a type only: importing it would pull torch into the CLI's start
    from hybrid.runtime.stats import EngineStats

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
    cached_tokens: int = 0                                    # prompt tokens served by the prefix cache


@dataclass(frozen=True)
class Delta:
    pieces: tuple[Piece, ...]
    samples: tuple[TokenSample, ...] = ()


@dataclass(frozen=True)
class End:
    result: Result


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass(frozen=True)
class Gone:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


JobEvent = Union[Delta, End, Failed, Gone, Shutdown]
TERMINAL = (End, Failed, Gone, Shutdown)       # a job sends nothing after one of these


class _Output:
    """Generated ids -> events: UTF-8 assembly, then stop strings, then (chat with tools) tool calls."""

    def __init__(self, tokenizer, stops, parse_tools: bool):
        self.decoder = tokenizer.stream(skip_special=True)
        self.stopper = StopMatcher(stops)
        self.tools = ToolCallStream() if parse_tools else None
        self.pieces: list[str] = []

    def push(self, token: int) -> list[Piece]:
        return self._route(self.stopper.push(self.decoder.push(token)))

    def finish(self) -> list[Piece]:
        tail = "" if self.stopper.stopped else self.stopper.push(self.decoder.flush())
        events = self._route(tail + self.stopper.finish())
        return events + (self.tools.finish() if self.tools else [])

    def _route(self, text: str) -> list[Piece]:
        if not text:
            return []
        self.pieces.append(text)
        return self.tools.push(text) if self.tools else [Content(text)]


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
            self._post(Delta(tuple(events), tuple(self._take_samples())))
        return not (self._out.stopper.stopped or self.cancelled.is_set())

    def _take_samples(self) -> list[TokenSample]:
        taken, self._pending = self._pending, []
        self._delivered += taken
        return taken

    def finish(self, out: list[int], cached_tokens: int = 0) -> None:
        events, samples = self._out.finish(), self._take_samples()
        if events or samples:         # samples of tokens without text of their own (specials) go out too
            self._post(Delta(tuple(events), tuple(samples)))
        text = "".join(self._out.pieces)
        content, calls = parse_tool_calls(text) if self.parse_tools else (text, [])
        if self._out.stopper.stopped or (out and out[-1] in self.stop_ids):
            reason = "stop"
        else:
            reason = "length" if len(out) >= self.max_new_tokens else "stop"
        if calls:
            reason = "tool_calls"     # as vLLM: a parsed call wins, so the client runs it
        self._post(End(Result(reason, len(self.ids), len(out), text, content, calls,
                              self._out.stopper.matched, self._delivered, cached_tokens)))

    def fail(self, exc: Exception) -> None:
        self._post(Failed(exc))

    def _post(self, event: JobEvent) -> None:
        if self.cancelled.is_set():
            return
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:          # the loop is closed: nobody is listening any more
            self.cancelled.set()


class Worker:
    """Runs Jobs through the engine's continuous batching on one daemon thread (start() / close()).

    Between steps the thread hands new jobs to the engine (engine.submit), passes on cancellations
    (engine.cancel) and reports finished ones; the engine's scheduler decides which run in each step.
    What it needs of the engine: submit(Request) -> handle, step(), cancel(handle), output(handle),
    outcome(handle), cached_tokens(handle), max_batch, stats(); a handle has `status` (waiting | running |
    finished).
    Admission: a request is refused (QueueFull -> 503) when it would leave more than max_queue requests
    waiting beyond the engine's max_batch running ones.
    """

    def __init__(self, engine, max_queue: int):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0 (waiting requests), got {max_queue!r}")
        self.engine, self.max_queue = engine, max_queue
        self.counts = collections.Counter()      # finished, cancelled, failed, prompt/completion tokens
        self.engine_stats: EngineStats = engine.stats()  # refreshed by the worker thread after jobs end
        self._inbox: collections.deque[Job] = collections.deque()    # submitted, not yet given to the engine
        self._active: dict[Job, object] = {}                          # given to the engine: job -> its handle
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
            running, waiting = self._depth()
            free = max(0, self.engine.max_batch - running)
            if waiting + len(jobs) - free > self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting and {running} are running (--max-batch "
                                f"{self.engine.max_batch}, --max-queue {self.max_queue})")
            self._inbox.extend(jobs)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job from the queue, or end it at the next step (freeing its cache)."""
        job.cancelled.set()
        with self._cond:
            if job in self._inbox:
                self._inbox.remove(job)
                self.counts["cancelled"] += 1
            self._cond.notify()

    def depth(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._cond:
            return self._depth()

    def stop_accepting(self) -> list[Job]:
        """Shutdown begins: refuse new jobs; the waiting ones are dropped and returned (running ones go on)."""
        with self._cond:
            self._closed = True
            dropped = list(self._inbox) + [j for j, h in self._active.items() if h.status == "waiting"]
            self._inbox.clear()
            self.counts["cancelled"] += len(dropped)
            for job in dropped:
                job.cancelled.set()
            self._cond.notify()
        return dropped

    def in_flight(self) -> list[Job]:
        """The jobs generating now."""
        with self._cond:
            return [j for j, h in self._active.items() if h.status == "running" and not j.cancelled.is_set()]

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            for job in [*self._inbox, *self._active]:
                job.cancelled.set()
            self._inbox.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------------------
    def _depth(self) -> tuple[int, int]:
        """(running, waiting); a cancelled job no longer counts (the engine drops it at its next step)."""
        live = [h for j, h in self._active.items() if not j.cancelled.is_set()]
        return (sum(h.status == "running" for h in live),
                len(self._inbox) + sum(h.status == "waiting" for h in live))

    def _loop(self) -> None:
        """Until closed: admit new jobs, pass on cancellations, one engine step, report what ended. (Each part
        is a method, so this frame holds no job between steps: an idle worker keeps no request alive.)"""
        while True:
            closing = self._admit_new()
            self._pass_cancels()
            try:
                self.engine.step()
            except Exception as e:        # the forward failed: every job in the engine fails; the server goes on
                self._fail_all(e)
            self._report()
            if closing and not self._active:
                return

    def _admit_new(self) -> bool:
        """Wait for work; hand the new jobs to the engine. Returns whether the worker is closing."""
        with self._cond:
            while not self._inbox and not self._active and not self._closed:
                self._cond.wait()
            new = list(self._inbox)
            self._inbox.clear()
            closing = self._closed
        for job in new:
            self._admit(job)
        return closing

    def _pass_cancels(self) -> None:
        """Jobs cancelled since the last step (a client left, a shutdown cut, close()) end in the engine."""
        for job, handle in list(self._active.items()):
            if job.cancelled.is_set():
                self.engine.cancel(handle)

    def _admit(self, job: Job) -> None:
        from hybrid.runtime.engine import Request
        try:
            handle = self.engine.submit(Request(job.ids, job.max_new_tokens, job.params, job.stop_ids,
                                                job.processors, job.on_sample))
        except Exception as e:            # refused by the engine (e.g. larger than the KV pool): this job only
            self.counts["failed"] += 1
            job.fail(e)
            return
        with self._cond:
            self._active[job] = handle

    def _report(self) -> None:
        """Finished handles -> their jobs' end (or error) events and the counters."""
        ended = [(j, h) for j, h in self._active.items() if h.status == "finished"]
        for job, handle in ended:
            out = self.engine.output(handle)
            reason, error = self.engine.outcome(handle)
            if error is not None:
                self.counts["failed"] += 1
                job.fail(error)
            elif job.cancelled.is_set():
                self.counts["cancelled"] += 1
            else:
                job.finish(out, self.engine.cached_tokens(handle))
                self.counts["finished"] += 1
            self.counts.update({"prompt_tokens": len(job.ids), "completion_tokens": len(out)})
        if ended:
            with self._cond:
                for job, _ in ended:
                    del self._active[job]
            self._refresh_stats()

    def _fail_all(self, e: Exception) -> None:
        with self._cond:
            jobs = list(self._active.items())
            self._active.clear()
        for job, handle in jobs:
            self.engine.cancel(handle)
            self.counts["failed"] += 1
            job.fail(e)
        self.engine.step()                # drops the cancelled handles, frees their cache blocks
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        try:
            self.engine_stats = self.engine.stats()
        except Exception:                 # metrics must never take the worker down
            pass
