"""OpenAI responses: one JSON body, or server-sent-event chunks ending with `data: [DONE]`.

    chat:  chat.completion.chunk   per choice: delta {"role", "content": ""} first, then {"content": text} or
                                   {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}
                                   then {"tool_calls": [{"index", "function": {"arguments": chunk}}]} ...,
                                   then {} with finish_reason; "logprobs" of the chunk's tokens when asked for;
                                   with stream_options.include_usage every chunk carries "usage": null and a
                                   last chunk has no choices and the usage.
    text:  text_completion         choices [{"index", "text": chunk, "finish_reason", "logprobs"}]
An engine error mid-stream, or a server shutdown, is sent as one `data: {"error": {...}}` event, then [DONE].
"""
from __future__ import annotations

import json

from hybrid.serve.listen import Listen, engine_error, shutdown_error
from hybrid.serve.streaming import CallStart, Content, Piece
from hybrid.serve.worker import Delta, End, Failed, JobEvent, Shutdown
from hybrid.serve.logprobs import chat_logprobs, completion_logprobs

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def usage(results) -> dict:
    """Usage of a request's choices: the prompt once, the completions summed."""
    prompt, completion = results[0].prompt_tokens, sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens}}


def chat_body(meta: dict, results, tok, logprobs: bool) -> dict:
    choices = []
    for i, res in enumerate(results):
        msg = {"role": "assistant", "content": res.content or (None if res.tool_calls else "")}
        if res.tool_calls:
            msg["tool_calls"] = res.tool_calls
        choices.append({"index": i, "message": msg, "finish_reason": res.finish_reason,
                        "logprobs": chat_logprobs(tok, res.samples) if logprobs else None})
    return {**meta, "choices": choices, "usage": usage(results)}


def text_body(meta: dict, results, tok, logprobs: bool) -> dict:
    choices = [{"index": i, "text": res.text, "finish_reason": res.finish_reason,
                "logprobs": completion_logprobs(tok, res.samples) if logprobs else None}
               for i, res in enumerate(results)]
    return {**meta, "choices": choices, "usage": usage(results)}


def _chat_delta(p: Piece) -> dict:
    if isinstance(p, Content):
        return {"content": p.text}
    if isinstance(p, CallStart):
        return {"tool_calls": [{"index": p.index, "id": p.id, "type": "function",
                                "function": {"name": p.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": p.index, "function": {"arguments": p.text}}]}


def _failure(ev: JobEvent) -> str | None:
    """The error event that ends a stream, or None when the event does not end it badly (Gone)."""
    if isinstance(ev, Failed):
        return sse(engine_error(ev.error).body())
    if isinstance(ev, Shutdown):
        return sse(shutdown_error().body())
    return None


async def chat_chunks(listen: Listen, meta: dict, include_usage: bool, tok, logprobs: bool):
    base = {**meta, "object": "chat.completion.chunk"}

    def chunk(i: int, delta: dict, finish: str | None = None, samples=()) -> str:
        lp = chat_logprobs(tok, samples) if logprobs and samples else None
        c = {**base, "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}]}
        return sse({**c, "usage": None} if include_usage else c)

    async def body():
        for i in range(len(listen.jobs)):
            yield chunk(i, {"role": "assistant", "content": ""})
        results = {}
        while len(results) < len(listen.jobs):
            got = await listen.get()
            i, ev = got.index, got.event
            if isinstance(ev, Delta):
                for k, p in enumerate(ev.pieces):
                    yield chunk(i, _chat_delta(p), samples=ev.samples if k == 0 else ())
                if not ev.pieces and ev.samples:        # tokens without text (specials, cut by a stop)
                    yield chunk(i, {}, samples=ev.samples)
            elif isinstance(ev, End):
                results[i] = ev.result
                yield chunk(i, {}, ev.result.finish_reason)
            else:                    # gone: nothing more to send; error / shutdown: say so
                if (failure := _failure(ev)) is not None:
                    yield failure
                return
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(list(results.values()))})

    async for text in closing(listen, body):
        yield text


async def text_chunks(listen: Listen, meta: dict, include_usage: bool, tok, logprobs: bool):
    offsets = [0] * len(listen.jobs)

    def chunk(i: int, text: str, finish: str | None = None, samples=()) -> str:
        lp = completion_logprobs(tok, samples, offsets[i]) if logprobs and samples else None
        offsets[i] += len(text)
        c = {**meta, "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": lp}]}
        return sse({**c, "usage": None} if include_usage else c)

    async def body():
        results = {}
        while len(results) < len(listen.jobs):
            got = await listen.get()
            i, ev = got.index, got.event
            if isinstance(ev, Delta):
                text = "".join(p.text for p in ev.pieces if isinstance(p, Content))
                if text or ev.samples:
                    yield chunk(i, text, samples=ev.samples)
            elif isinstance(ev, End):
                results[i] = ev.result
                yield chunk(i, "", ev.result.finish_reason)
            else:
                if (failure := _failure(ev)) is not None:
                    yield failure
                return
        if include_usage:
            yield sse({**meta, "choices": [], "usage": usage(list(results.values()))})

    async for text in closing(listen, body):
        yield text


async def closing(listen: Listen, body, done: str = DONE):
    """body()'s chunks, then `done`; whatever ends the stream (done, error, client gone), the jobs are
    released first (listen.close is synchronous, so a cancelled task still runs it)."""
    chunks = body()
    try:
        async for text in chunks:
            yield text
        if done:
            yield done
    finally:
        listen.close()
        await chunks.aclose()
