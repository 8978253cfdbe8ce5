"""Anthropic's streaming events for /v1/messages, from the same job events as the OpenAI stream.

    message_start {message: {id, type, role, model, content: [], stop_reason: null, usage}}
    content_block_start {index, content_block: {type: "text", text: ""}}
    content_block_delta {index, delta: {type: "text_delta", text}}              text before any call
    content_block_stop {index}
    content_block_start {index, content_block: {type: "tool_use", id, name, input: {}}}   per K2 call
    content_block_delta {index, delta: {type: "input_json_delta", partial_json}}
    content_block_stop {index}
    message_delta {delta: {stop_reason, stop_sequence}, usage: {output_tokens}}
    message_stop
An engine error or a server shutdown mid-stream is one `event: error` with Anthropic's error object.
"""
from __future__ import annotations

import json

from hybrid.serve.anthropic import anthropic_id, stop_reason
from hybrid.serve.listen import Listen, engine_error, shutdown_error
from hybrid.serve.sse import closing
from hybrid.serve.streaming import CallStart, Content, Piece
from hybrid.serve.worker import Delta, End, Failed, Gone


def event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: " + json.dumps({"type": kind, **data}, ensure_ascii=False) + "\n\n"


class _Blocks:
    """Content blocks as they open and close: the text block, then one tool_use block per call."""

    def __init__(self):
        self.index, self.open_kind = -1, None

    def start(self, kind: str, block: dict) -> list[str]:
        out = self.stop()
        self.index += 1
        self.open_kind = kind
        return out + [event("content_block_start", {"index": self.index, "content_block": block})]

    def stop(self) -> list[str]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [event("content_block_stop", {"index": self.index})]

    def delta(self, p: Piece) -> list[str]:
        if isinstance(p, Content):
            out = [] if self.open_kind == "text" else self.start("text", {"type": "text", "text": ""})
            return out + [event("content_block_delta", {"index": self.index,
                                                        "delta": {"type": "text_delta", "text": p.text}})]
        if isinstance(p, CallStart):
            return self.start("tool_use", {"type": "tool_use", "id": anthropic_id(p.id), "name": p.name,
                                           "input": {}})
        return [event("content_block_delta", {"index": self.index,
                                              "delta": {"type": "input_json_delta", "partial_json": p.text}})]


async def message_events(listen: Listen, meta: dict, prompt_tokens: int):
    async def body():
        yield event("message_start", {"message": {**meta, "content": [], "stop_reason": None,
                                                  "stop_sequence": None,
                                                  "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})
        blocks = _Blocks()
        while True:
            ev = (await listen.get()).event
            if isinstance(ev, Delta):
                for p in ev.pieces:
                    for text in blocks.delta(p):
                        yield text
            elif isinstance(ev, End):
                for text in blocks.stop():
                    yield text
                reason, sequence = stop_reason(ev.result)
                yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                              "usage": {"output_tokens": ev.result.completion_tokens}})
                yield event("message_stop", {})
                return
            else:                     # gone: nobody listens; error / shutdown: Anthropic's error event
                if not isinstance(ev, Gone):
                    err = engine_error(ev.error) if isinstance(ev, Failed) else shutdown_error()
                    yield event("error", {"error": err.anthropic_body()["error"]})
                return

    async for text in closing(listen, body, done=""):
        yield text
