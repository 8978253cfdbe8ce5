"""Streaming responses: OpenAI's server-sent-event chunks, ending with `data: [DONE]`.

    chat:  chat.completion.chunk   delta {"role", "content": ""} first, then {"content": text} or
                                   {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}
                                   then {"tool_calls": [{"index", "function": {"arguments": chunk}}]} ...,
                                   then {} with finish_reason; with stream_options.include_usage every chunk
                                   carries "usage": null and a last chunk has no choices and the usage.
    text:  text_completion         choices [{"index": 0, "text": chunk, "finish_reason", "logprobs": null}]
An engine error mid-stream is sent as one `data: {"error": {...}}` event, then [DONE].
"""
from __future__ import annotations

import json

from hybrid.serve.api import ApiError

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def engine_error(e: Exception) -> ApiError:
    if isinstance(e, ValueError):      # the engine's own input checks
        return ApiError(400, f"generation refused: {e}", None, "invalid_value")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}")


def _chat_delta(ev: tuple) -> dict:
    if ev[0] == "content":
        return {"content": ev[1]}
    if ev[0] == "call":
        _, index, call_id, name = ev
        return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                "function": {"name": name, "arguments": ""}}]}
    _, index, text = ev
    return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


async def chat_chunks(listen, meta: dict, include_usage: bool):
    base = {**meta, "object": "chat.completion.chunk"}

    def chunk(delta: dict, finish: str | None = None) -> str:
        c = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return sse({**c, "usage": None} if include_usage else c)

    async def body():
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, payload = await listen.get()
            if kind == "delta":
                for ev in payload:
                    yield chunk(_chat_delta(ev))
                continue
            if kind == "gone":       # the client left; nothing more to send
                return
            if kind == "end":
                yield chunk({}, payload.finish_reason)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(payload)})
            else:
                yield sse(engine_error(payload).body())
            return

    async for text in _closing(listen, body):
        yield text


async def text_chunks(listen, meta: dict, include_usage: bool):
    def chunk(text: str, finish: str | None = None) -> str:
        c = {**meta, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
        return sse({**c, "usage": None} if include_usage else c)

    async def body():
        while True:
            kind, payload = await listen.get()
            if kind == "delta":
                text = "".join(ev[1] for ev in payload)
                if text:
                    yield chunk(text)
                continue
            if kind == "gone":       # the client left; nothing more to send
                return
            if kind == "end":
                yield chunk("", payload.finish_reason)
                if include_usage:
                    yield sse({**meta, "choices": [], "usage": usage(payload)})
            else:
                yield sse(engine_error(payload).body())
            return

    async for text in _closing(listen, body):
        yield text


async def _closing(listen, body):
    """body()'s chunks, then [DONE]; whatever ends the stream (done, error, client gone), the job is
    released first (listen.close is synchronous, so a cancelled task still runs it)."""
    chunks = body()
    try:
        async for text in chunks:
            yield text
        yield DONE
    finally:
        listen.close()
        await chunks.aclose()
