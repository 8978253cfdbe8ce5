"""Shutdown with requests in flight: no stream is cut off without a word.

Drain.begin(grace_s) is called when the server is told to stop (Ctrl-C / SIGTERM, from the signal handler):
new requests get 503; waiting ones end at once with a shutdown error; the running ones may finish for most of
the grace period, and whatever still runs then is cancelled and its client gets a final error event (OpenAI
or Anthropic shape, then [DONE] on the OpenAI side) before uvicorn's own deadline cancels the tasks.
"""
from __future__ import annotations

import asyncio

from hybrid.serve.worker import Shutdown, Worker


def cut_time(grace_s: float) -> float:
    """When, after shutdown begins, running streams are ended: leaving up to 1 s of the grace period for the
    final events to reach the clients."""
    return max(0.0, grace_s - min(1.0, grace_s / 2))


class Drain:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.loop: asyncio.AbstractEventLoop | None = None       # set when the app starts
        self.begun = False

    def begin(self, grace_s: float) -> None:
        """Start draining (idempotent; safe from a signal handler or another thread)."""
        if self.loop is None or self.begun:
            return
        self.begun = True
        self.loop.call_soon_threadsafe(self._begin, grace_s)

    def _begin(self, grace_s: float) -> None:
        for job in self.worker.stop_accepting():
            job.events.put_nowait(Shutdown())
        self.loop.call_later(cut_time(grace_s), self._cut)

    def _cut(self) -> None:
        for job in self.worker.in_flight():
            self.worker.cancel(job)
            job.events.put_nowait(Shutdown())
