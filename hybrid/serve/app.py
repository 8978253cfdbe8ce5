"""`hybrid serve`: OpenAI- and Anthropic-compatible HTTP APIs (FastAPI + uvicorn) over one Engine.

Endpoints: GET /v1/models[/{id}], POST /v1/chat/completions, POST /v1/completions, POST /v1/messages,
POST /v1/messages/count_tokens (all generating ones with SSE streaming), GET /health, GET /metrics
(Prometheus text). Errors come in the error object of the API called (errors.py); with an API key (auth.py)
every endpoint but /health wants it.

    request -> JSON body, bounded in size and nesting (body.py) -> validate (api.py / anthropic.py)
            -> K2 chat template (chat.encode_chat) -> context check (400)
            -> output constraint compiled (grammar.py; 400 naming the schema's field)
            -> one Job per choice to the worker (worker.py; 503 when full) -> the engine's continuous batching
            -> per-token events (text, tool-call header, argument chunks, samples)
            -> SSE (sse.py, anthropic_sse.py) or one JSON body

What the server needs of the engine (hybrid.Engine has it; tests pass fakes): `tokenizer`, `device`,
`cfg.vocab_size`, `max_context`, `default_stop_ids()`, `stats()`, and what worker.Worker calls (submit,
step, cancel, output, outcome, cached_tokens, max_batch).

Example:
    $ hybrid serve --model /models/Kimi-K2-Instruct --port 8000 --api-key sk-local
    >>> import openai
    >>> c = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    >>> c.chat.completions.create(model="kimi-k2", messages=[{"role": "user", "content": "Hi"}], stream=True)
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrid.serve.anthropic import message_body, parse_messages
from hybrid.serve.anthropic_sse import message_events
from hybrid.serve.api import ChatRequest, Generation, parse_chat, parse_completion
from hybrid.serve.auth import ApiKey
from hybrid.serve.body import DEFAULT_MAX_BODY, json_body
from hybrid.serve.drain import Drain
from hybrid.serve.errors import ApiError, error_body
from hybrid.serve.grammar import Constraint, Grammars
from hybrid.serve.listen import Listen
from hybrid.serve.metrics import RequestCounter, prometheus_text
from hybrid.serve.sse import chat_body, chat_chunks, text_body, text_chunks
from hybrid.serve.topk import TopK
from hybrid.serve.worker import Job, QueueFull, Worker
from hybrid.text.chat import encode_chat

BIG_PROMPT_CHARS = 1_000_000     # prompts this long are tokenized on their own one-thread pool


def create_app(engine, served_model_name: str = "kimi-k2", max_queue: int = 64,
               max_body_bytes: int = DEFAULT_MAX_BODY, api_key: str | None = None) -> FastAPI:
    """The ASGI app serving `engine`. The worker thread starts and stops with the app's lifespan.

    Args:
        max_queue: requests that may wait beyond the engine's running batch; more get 503.
        max_body_bytes: larger request bodies get 413.
        api_key: when set, required on every endpoint but /health (Bearer or x-api-key); 401 otherwise.
    """
    if engine.tokenizer is None:
        raise ValueError("the model folder has no tokenizer (tiktoken.model, tokenizer_config.json); the "
                         "server needs one to render chats and return text. Copy them from the release.")
    worker, counter = Worker(engine, max_queue), RequestCounter()
    # The next mask is computed on a helper thread while the step runs on a GPU; on a CPU-only engine the
    # step has the cores, and the thread handoff (~200 us/token measured) cost more than the fill it hid.
    grammars = Grammars(engine.tokenizer, engine.cfg.vocab_size, overlap=engine.device.type == "cuda")
    drain = Drain(worker)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        drain.loop = asyncio.get_running_loop()
        worker.start()
        yield
        worker.close()
        grammars.close()

    app = FastAPI(title="hybrid", lifespan=lifespan)
    app.state.worker, app.state.counter, app.state.drain = worker, counter, drain
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(RequestCounter.Middleware, counter=counter)      # outermost: counts the 401s too
    _error_handlers(app)
    _routes(app, _Api(engine, worker, grammars, served_model_name, max_body_bytes), worker, counter)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error leaves in the shape of the API called (OpenAI's or Anthropic's), never as a traceback."""
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(error_body(request.url.path, e), e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        err = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None,
                       "not_found" if e.status_code == 404 else None)
        return JSONResponse(error_body(request.url.path, err), e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e):
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(error_body(request.url.path, err), 500)


def _routes(app: FastAPI, api: "_Api", worker: Worker, counter: RequestCounter) -> None:
    app.get("/health")(api.health)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(worker, counter), media_type="text/plain; version=0.0.4")

    app.get("/v1/models")(api.models)
    app.get("/v1/models/{model_id:path}")(api.model)
    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/messages")(api.messages)
    app.post("/v1/messages/count_tokens")(api.count_tokens)


class _Api:
    def __init__(self, engine, worker: Worker, grammars: Grammars, name: str, max_body: int):
        self.engine, self.worker, self.grammars = engine, worker, grammars
        self.name, self.max_body = name, max_body
        self.tok, self.created = engine.tokenizer, int(time.time())
        # Prompts of over BIG_PROMPT_CHARS are tokenized here, one at a time, so they cannot fill the pool
        # that every other request's tokenizing and grammar compiling run on.
        self.big_prompts = ThreadPoolExecutor(1, thread_name_prefix="hybrid-big-prompts")

    async def _tokenize(self, chars: int, param: str, fn, *args):
        """fn(*args) off the event loop, after refusing (400) a text whose `chars` characters make more
        tokens than the context holds even at the longest token's length (nothing is tokenized then)."""
        at_least = -(-chars // self.tok.max_token_bytes)
        if at_least > self.engine.max_context:
            raise ApiError(400, f"This model's maximum context length is {self.engine.max_context} tokens, and "
                                f"the {param} ({chars:,} characters) makes at least {at_least:,} tokens. Please "
                                f"shorten it.", param, "context_length_exceeded")
        if chars <= BIG_PROMPT_CHARS:
            return await asyncio.to_thread(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self.big_prompts, lambda: fn(*args))

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
                "max_model_len": self.engine.max_context}

    # ---- OpenAI -----------------------------------------------------------------------------------
    async def chat(self, request: Request):
        req = parse_chat(await json_body(request, self.max_body), self.name)
        ids = await self._render(req)
        listen = await self._start(request, ids, req, "messages")
        meta = self._meta("chatcmpl-", "chat.completion")
        return await self._respond(listen, req.generation, meta, chat_chunks, chat_body)

    async def completions(self, request: Request):
        req = parse_completion(await json_body(request, self.max_body), self.name)
        if isinstance(req.prompt, str):     # raw prompt: special-token names allowed, as K2's encode does
            ids = await self._tokenize(len(req.prompt), "prompt", self.tok.encode, req.prompt, True)
        else:
            ids, vocab = req.prompt, self.engine.cfg.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ApiError(400, f"prompt token ids {bad[:5]} are outside this model's vocabulary "
                               f"[0, {vocab})", "prompt", "invalid_value")
        listen = await self._start_jobs(request, ids, req.generation, False, None, "prompt")
        meta = self._meta("cmpl-", "text_completion")
        return await self._respond(listen, req.generation, meta, text_chunks, text_body)

    async def _respond(self, listen: Listen, gen: Generation, meta: dict, chunks, body):
        logprobs = gen.params.logprobs is not None
        if gen.stream:
            return _sse(chunks(listen, meta, gen.include_usage, self.tok, logprobs))
        try:
            results = await listen.results()
        finally:
            listen.close()
        return body(meta, results, self.tok, logprobs)

    # ---- Anthropic --------------------------------------------------------------------------------
    async def messages(self, request: Request):
        req = parse_messages(await json_body(request, self.max_body), self.name)
        ids = await self._render(req)
        listen = await self._start(request, ids, req, "messages")
        meta = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": self.name}
        if req.generation.stream:
            return _sse(message_events(listen, meta, len(ids)))
        try:
            results = await listen.results()
        finally:
            listen.close()
        return message_body(meta, results[0])

    async def count_tokens(self, request: Request):
        req = parse_messages(await json_body(request, self.max_body), self.name, need_max_tokens=False)
        return {"input_tokens": len(await self._render(req))}

    # ---- shared -----------------------------------------------------------------------------------
    def _meta(self, prefix: str, kind: str) -> dict:
        return {"id": prefix + uuid.uuid4().hex, "object": kind, "created": int(time.time()), "model": self.name}

    async def _render(self, req: ChatRequest) -> list[int]:
        try:     # off the event loop: a long prompt takes a while to tokenize
            return await self._tokenize(_content_chars(req.messages), "messages", encode_chat, self.tok,
                                        req.messages, req.tools)
        except (TypeError, ValueError, KeyError) as e:
            raise ApiError(400, f"messages cannot be rendered with K2's chat template: {e}", "messages",
                           "invalid_value") from None

    async def _start(self, request, ids: list[int], req: ChatRequest, param: str) -> Listen:
        return await self._start_jobs(request, ids, req.generation, req.tools is not None, req.constraint, param)

    async def _start_jobs(self, request, ids: list[int], gen: Generation, parse_tools: bool,
                          constraint: Constraint | None, param: str) -> Listen:
        """One Job per choice, queued together; their processors (grammar mask, top-k) built off the loop."""
        max_new = _budget(len(ids), gen.max_tokens, self.engine.max_context, param)
        processors = await asyncio.to_thread(self._processors, constraint, gen, max_new)
        loop, stop_ids = asyncio.get_running_loop(), self.engine.default_stop_ids()
        jobs = [Job(ids, max_new, gen.for_choice(i), gen.stop, stop_ids, self.tok, parse_tools, loop, procs, i)
                for i, procs in enumerate(processors)]
        try:
            self.worker.submit(*jobs)
        except QueueFull as e:
            raise ApiError(503, f"The server is busy: {e}. Retry later.", None, "queue_full",
                           headers={"Retry-After": "1"}) from None
        return Listen(request, jobs, self.worker)

    def _processors(self, constraint: Constraint | None, gen: Generation, max_new: int) -> list[tuple]:
        """Each choice's own logits processors: the grammar mask (compiled once), then top-k."""
        grammar = self.grammars.compile(constraint) if constraint is not None else None
        return [((self.grammars.mask(grammar, max_new),) if grammar else ()) + ((TopK(gen.top_k),) if gen.top_k else ())
                for _ in range(gen.n)]


def _content_chars(messages: list[dict]) -> int:
    """Characters of the messages' text content (strings, and text parts of part lists): all of it is
    rendered into the prompt, so it bounds the prompt's length from below."""
    n = 0
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            n += len(c)
        elif isinstance(c, list):
            n += sum(len(p["text"]) for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    return n


def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
