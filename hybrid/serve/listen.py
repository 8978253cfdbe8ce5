"""A request's view of its jobs (one per choice): their events merged into one queue, tagged by choice; the
jobs are cancelled when the client disconnects or the request ends."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hybrid.serve.errors import ApiError
from hybrid.serve.worker import TERMINAL, End, Failed, Gone, Job, JobEvent, Result, Shutdown, Worker

SHUTDOWN_MESSAGE = "the server is shutting down; this response was cut off. Retry on another server or later."


@dataclass(frozen=True)
class Event:
    index: int                    # the choice (0 when n == 1)
    event: JobEvent               # what its job sent (worker.py), or Gone() when the client left


def engine_error(e: Exception) -> ApiError:
    if isinstance(e, ValueError):      # the engine's own input checks
        return ApiError(400, f"generation refused: {e}", None, "invalid_value")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}")


def shutdown_error() -> ApiError:
    return ApiError(503, SHUTDOWN_MESSAGE, None, "server_shutdown")


class Listen:
    def __init__(self, request, jobs: list[Job], worker: Worker):
        self.jobs, self._worker = jobs, worker
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._tasks = [asyncio.ensure_future(self._forward(j)) for j in jobs]
        self._tasks.append(asyncio.ensure_future(self._disconnect(request)))

    async def _forward(self, job: Job) -> None:
        while True:
            ev = await job.events.get()
            self.queue.put_nowait(Event(job.index, ev))
            if isinstance(ev, TERMINAL):
                return

    async def _disconnect(self, request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for job in self.jobs:
            self._worker.cancel(job)
        self.queue.put_nowait(Event(0, Gone()))      # wakes whoever waits for this request's events

    async def get(self) -> Event:
        return await self.queue.get()

    async def results(self) -> list[Result]:
        """Every choice's Result, by index; raises the ApiError the first failure calls for."""
        done: dict[int, Result] = {}
        while len(done) < len(self.jobs):
            ev = await self.get()
            match ev.event:
                case End(result):
                    done[ev.index] = result
                case Failed(error):
                    raise engine_error(error)
                case Shutdown():
                    raise shutdown_error()
                case Gone():                 # nobody will read the answer; 499 as nginx logs it
                    raise ApiError(499, "the client closed the request", None, "client_closed")
        return [done[i] for i in range(len(self.jobs))]

    def close(self) -> None:
        """Request over (done, failed or client gone): stop listening; jobs still going are cancelled."""
        for t in self._tasks:
            t.cancel()
        for job in self.jobs:
            self._worker.cancel(job)
