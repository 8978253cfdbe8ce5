"""`hybrid serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one Engine.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with SSE streaming),
GET /health, GET /metrics (Prometheus text). Errors use OpenAI's error object (server_api.ApiError).

    request -> validate (server_api) -> K2 chat template (chat.encode_chat) -> context check (400)
            -> Job into the FIFO (server_worker; 503 when full) -> engine.generate on the worker thread
            -> per-token events (text, tool-call header, argument chunks) -> SSE chunks or one JSON body

What the server needs of the engine (hybrid.Engine has it; tests pass fakes): `tokenizer`,
`cfg.max_position_embeddings`, `cfg.vocab_size`, `default_stop_ids()`, `stats()`, and
`generate(ids, max_new_tokens, temperature=, top_p=, seed=, stop_ids=, on_token=)`.
No authentication: the default bind is loopback.

Example:
    $ hybrid serve --model /models/Kimi-K2-Instruct --port 8000        # no --model: the bundled tiny model
    >>> import openai
    >>> c = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    >>> c.chat.completions.create(model="kimi-k2", messages=[{"role": "user", "content": "Hi"}], stream=True)
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrid.text.chat import encode_chat
from hybrid.serve.api import ApiError, Sampling, parse_chat, parse_completion
from hybrid.serve.metrics import RequestCounter, prometheus_text
from hybrid.serve.sse import chat_chunks, engine_error, text_chunks, usage
from hybrid.serve.worker import Job, QueueFull, Worker

DEFAULT_MAX_BODY = 32 << 20    # K2's 128K-token context is ~0.5 MB of text; 32 MiB leaves room for tool schemas


def create_app(engine, served_model_name: str = "kimi-k2", max_queue: int = 64,
               max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The ASGI app serving `engine`. The worker thread starts and stops with the app's lifespan.

    Args:
        max_queue: requests that may wait while one runs; more get 503 (OpenAI error object).
        max_body_bytes: larger request bodies get 413.
    """
    if engine.tokenizer is None:
        raise ValueError("the model folder has no tokenizer (tiktoken.model, tokenizer_config.json); the "
                         "server needs one to render chats and return text. Copy them from the release.")
    worker = Worker(engine, max_queue)
    counter = RequestCounter()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.close()

    app = FastAPI(title="hybrid", lifespan=lifespan)
    app.state.worker, app.state.counter = worker, counter
    app.add_middleware(RequestCounter.Middleware, counter=counter)
    api = _Api(engine, worker, served_model_name, max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        err = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None,
                       "not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e):
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(err.body(), 500)

    app.get("/health")(api.health)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(worker, counter), media_type="text/plain; version=0.0.4")

    app.get("/v1/models")(api.models)
    app.get("/v1/models/{model_id:path}")(api.model)
    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/completions")(api.completions)
    return app


class _Api:
    def __init__(self, engine, worker: Worker, name: str, max_body: int):
        self.engine, self.worker, self.name, self.max_body = engine, worker, name, max_body
        self.tok, self.created = engine.tokenizer, int(time.time())

    async def health(self):
        running, waiting = self.worker.depth()
        return {"status": "ok", "model": self.name, "running": running, "waiting": waiting,
                "max_queue": self.worker.max_queue}

    async def models(self):
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str):
        if model_id != self.name:
            raise ApiError(404, f"The model {model_id!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")
        return self._card()

    def _card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "hybrid",
                "max_model_len": self.engine.cfg.max_position_embeddings}

    async def chat(self, request: Request):
        req = parse_chat(await _json_body(request, self.max_body), self.name)
        try:     # off the event loop: a long prompt takes a while to tokenize
            ids = await asyncio.to_thread(encode_chat, self.tok, req.messages, req.tools)
        except (TypeError, ValueError, KeyError) as e:
            raise ApiError(400, f"messages cannot be rendered with K2's chat template: {e}", "messages",
                           "invalid_value") from None
        return await self._run(request, "chat", ids, req.sampling, parse_tools=req.tools is not None)

    async def completions(self, request: Request):
        req = parse_completion(await _json_body(request, self.max_body), self.name)
        if isinstance(req.prompt, str):     # raw prompt: special-token names allowed, as K2's encode does
            ids = await asyncio.to_thread(self.tok.encode, req.prompt, allow_special=True)
        else:
            ids, vocab = req.prompt, self.engine.cfg.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ApiError(400, f"prompt token ids {bad[:5]} are outside this model's vocabulary "
                               f"[0, {vocab})", "prompt", "invalid_value")
        return await self._run(request, "text", ids, req.sampling, parse_tools=False)

    async def _run(self, request, kind: str, ids: list[int], s: Sampling, parse_tools: bool):
        max_new = _budget(len(ids), s.max_tokens, self.engine.cfg.max_position_embeddings,
                          "messages" if kind == "chat" else "prompt")
        job = Job(ids, max_new, s, self.engine.default_stop_ids(), self.tok, parse_tools,
                  asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"The server is busy: {e}. Retry later.", None, "queue_full",
                           headers={"Retry-After": "1"}) from None
        meta = {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.name}
        listen = _Listen(request, job, self.worker)
        if s.stream:
            chunks = chat_chunks if kind == "chat" else text_chunks
            return StreamingResponse(chunks(listen, meta, s.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            res = await listen.result()
        finally:
            listen.close()
        usage_ = usage(res)
        if kind == "text":
            choice = {"index": 0, "text": res.text, "finish_reason": res.finish_reason, "logprobs": None}
        else:
            msg = {"role": "assistant", "content": res.content or (None if res.tool_calls else "")}
            if res.tool_calls:
                msg["tool_calls"] = res.tool_calls
            choice = {"index": 0, "message": msg, "finish_reason": res.finish_reason, "logprobs": None}
        return {**meta, "choices": [choice], "usage": usage_}


class _Listen:
    """A job's events, seen from the request: also cancels the job when the client disconnects."""

    def __init__(self, request: Request, job: Job, worker: Worker):
        self.job, self._worker = job, worker
        self._watch = asyncio.ensure_future(self._disconnect(request))

    async def _disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._worker.cancel(self.job)
        self.job.events.put_nowait(("gone", None))     # wakes whoever waits for this job's events

    async def get(self) -> tuple:
        return await self.job.events.get()

    async def result(self):
        while True:
            kind, payload = await self.get()
            if kind == "end":
                return payload
            if kind == "error":
                raise engine_error(payload)
            if kind == "gone":       # nobody will read the answer; 499 as nginx logs it
                raise ApiError(499, "the client closed the request", None, "client_closed")

    def close(self) -> None:
        """Request over (done, failed or client gone): stop watching; a job still going is cancelled."""
        self._watch.cancel()
        self._worker.cancel(self.job)


def _budget(n_prompt: int, max_tokens: int | None, context: int, param: str) -> int:
    """Tokens this request may generate; 400 with the numbers when the context cannot hold it."""
    if max_tokens is None:
        if n_prompt < context:
            return context - n_prompt
        max_tokens = 1
    if n_prompt + max_tokens > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} in the "
                       "completion). Please reduce the length of the prompt or of max_tokens.", param,
                       "context_length_exceeded")
    return max_tokens


async def _json_body(request: Request, limit: int):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes",
                       None, "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", None, "body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
