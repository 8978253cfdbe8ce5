"""Anthropic's Messages API (POST /v1/messages) mapped onto the same request the OpenAI side builds.

    system (string or text blocks)          -> a system message
    user blocks: text | tool_result         -> user text / tool messages ("## Return of {id}" in K2's template)
    assistant blocks: text | tool_use       -> assistant content + tool_calls (K2's tool-call section)
    tools [{name, description, input_schema}] -> OpenAI-style tools (K2's tool_declare turn)
    tool_choice auto | any | tool | none    -> not forced | forced any tool | forced this tool | tools hidden
    output_config.format (json_schema)      -> the answer held to the schema, as OpenAI's response_format
    stop_sequences, max_tokens (required), temperature (0..1), top_p, top_k, stream (the newest official
    client no longer sends temperature/top_p/top_k; older clients and agent frameworks do)
so both APIs render the same K2 chat template and parse the same tool-call format. Errors name the field
the way Anthropic does (`messages.1.content.0.type`). Images and documents are refused (the model reads text
only); thinking blocks in the history are dropped (K2's template renders none); `thinking` enabled is refused.

Tool-use ids: K2 names a call `functions.NAME:IDX`, which Anthropic's id pattern ([a-zA-Z0-9_-]) does not
allow, so it travels as `toolu_` + base64url(id) and is decoded when the conversation comes back; ids made
elsewhere are rendered as given.
"""
from __future__ import annotations

import base64
import binascii
import json
import re

from hybrid.serve.api import (DEFAULT_TEMPERATURE, ChatRequest, Generation, bad, check_tool_name, get_bool, get_int,
                              get_model, get_stops, sampling_params)
from hybrid.serve.errors import ApiError
from hybrid.serve.grammar import MAX_PARALLEL_CALLS, Constraint, Schema, Tool
from hybrid.text.chat import next_call_index

_ID_PREFIX = "toolu_"
_K2_ID = re.compile(r"^[^\s<>]+:\d+$")
_NAMES = {"temperature": "temperature", "top_p": "top_p"}


def anthropic_id(k2_id: str) -> str:
    return _ID_PREFIX + base64.urlsafe_b64encode(k2_id.encode()).decode().rstrip("=")


def k2_id(tool_use_id: str) -> str:
    """The K2 call id behind a tool_use id this server made; any other id unchanged."""
    if tool_use_id.startswith(_ID_PREFIX):
        code = tool_use_id[len(_ID_PREFIX):]
        try:
            decoded = base64.urlsafe_b64decode(code + "=" * (-len(code) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return tool_use_id
        if _K2_ID.match(decoded):
            return decoded
    return tool_use_id


def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content", content, "a string or a list of content blocks")
    for j, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise bad(f"{where}.content.{j}", b, 'a content block like {"type": "text", "text": "..."}')
    return content


def _text(b: dict, at: str) -> str:
    if not isinstance(b.get("text"), str):
        raise bad(f"{at}.text", b.get("text"), "a string")
    return b["text"]


def _refuse(kind: str, at: str) -> ApiError:
    return ApiError(400, f"{at}.type: content blocks of type {kind!r} are not supported here: this model reads "
                         "text only (no image or document input)", f"{at}.type", "unsupported_value")


def _tool_result(b: dict, at: str) -> dict:
    if not isinstance(b.get("tool_use_id"), str) or not b["tool_use_id"]:
        raise bad(f"{at}.tool_use_id", b.get("tool_use_id"), "the id of the tool_use this result answers")
    content = b.get("content", "")
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _refuse(kind, f"{at}.content.{k}")
            parts.append(_text(part, f"{at}.content.{k}"))
        content = "".join(parts)
    elif not isinstance(content, str):
        raise bad(f"{at}.content", content, "a string or a list of text blocks")
    if get_bool(b, "is_error", param=f"{at}.is_error"):
        content = "Error: " + content
    return {"role": "tool", "tool_call_id": k2_id(b["tool_use_id"]), "content": content}


def _user(blocks: list[dict], where: str) -> list[dict]:
    out, text = [], []
    for j, b in enumerate(blocks):
        at = f"{where}.content.{j}"
        if b["type"] == "text":
            text.append(_text(b, at))
        elif b["type"] == "tool_result":
            if text:
                out.append({"role": "user", "content": "".join(text)})
                text = []
            out.append(_tool_result(b, at))
        else:
            raise _refuse(b["type"], at)
    if text or not out:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _assistant(blocks: list[dict], where: str) -> dict:
    text, calls = [], []
    for j, b in enumerate(blocks):
        at = f"{where}.content.{j}"
        if b["type"] == "text":
            text.append(_text(b, at))
        elif b["type"] == "tool_use":
            if not isinstance(b.get("name"), str) or not isinstance(b.get("id"), str):
                raise bad(at, b, '{"type": "tool_use", "id": ..., "name": ..., "input": {...}}')
            if not isinstance(b.get("input"), dict):
                raise bad(f"{at}.input", b.get("input"), "an object (the tool's arguments)")
            calls.append({"id": k2_id(b["id"]), "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b["input"], ensure_ascii=False)}})
        elif b["type"] not in ("thinking", "redacted_thinking"):
            raise _refuse(b["type"], at)
    msg = {"role": "assistant", "content": "".join(text)}
    return {**msg, "tool_calls": calls} if calls else msg


def _system(body: dict) -> list[dict]:
    system = body.get("system")
    if system is None:
        return []
    if isinstance(system, list):
        parts = []
        for j, b in enumerate(system):
            if not isinstance(b, dict) or b.get("type") != "text":
                raise bad(f"system.{j}", b, 'a text block {"type": "text", "text": "..."}')
            parts.append(_text(b, f"system.{j}"))
        system = "".join(parts)
    if not isinstance(system, str):
        raise bad("system", system, "a string or a list of text blocks")
    return [{"role": "system", "content": system}]


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", msgs, "a non-empty list of messages")
    out = _system(body)
    for i, m in enumerate(msgs):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise bad(where, m, '{"role": "user" | "assistant", "content": ...}')
        if m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role must be 'user' or 'assistant', got {m.get('role')!r:.40}",
                           f"{where}.role", "invalid_value")
        blocks = _blocks(m.get("content"), where)
        out += _user(blocks, where) if m["role"] == "user" else [_assistant(blocks, where)]
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", tools, "a list of tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad(f"tools.{i}", t, '{"name": ..., "description": ..., "input_schema": {...}}')
        check_tool_name(t["name"], f"tools.{i}.name")
        if not isinstance(t.get("input_schema"), dict):
            raise ApiError(400, f"tools.{i}.input_schema: a tool needs its input_schema (a JSON schema object), "
                                f"got {t.get('input_schema')!r:.60}", f"tools.{i}.input_schema", "missing_schema")
        fn = {"name": t["name"], **({"description": t["description"]} if isinstance(t.get("description"), str)
                                    else {}), "parameters": t["input_schema"]}
        out.append({"type": "function", "function": fn})
    return out or None


def _answer(body: dict) -> Schema | None:
    """output_config.format: Anthropic's structured outputs ({"type": "json_schema", "schema": {...}})."""
    config = body.get("output_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise bad("output_config", config, 'an object like {"format": {"type": "json_schema", "schema": {...}}}')
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad("output_config.format", fmt, '{"type": "json_schema", "schema": {a JSON schema object}}')
    return Schema("output_config.format.schema", fmt["schema"])


def _constraint(body: dict, tools: list[dict] | None, messages: list[dict]) -> tuple[list[dict] | None, Constraint | None]:
    choice, answer = body.get("tool_choice"), _answer(body)
    kind = "auto" if choice is None else choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise bad("tool_choice", choice, '{"type": "auto" | "any" | "tool" | "none"}')
    all_tools = tuple(Tool(t["function"]["name"], Schema(f"tools.{i}.input_schema", t["function"]["parameters"]))
                      for i, t in enumerate(tools or []))
    one = isinstance(choice, dict) and get_bool(choice, "disable_parallel_tool_use",
                                                param="tool_choice.disable_parallel_tool_use")
    first, calls = next_call_index(messages), 1 if one else MAX_PARALLEL_CALLS
    if kind == "none":
        return None, (Constraint(answer=answer) if answer else None)
    if kind == "auto":
        return tools, (Constraint(answer=answer, tools=all_tools, max_calls=calls, first_index=first)
                       if answer else None)
    if not tools:
        raise ApiError(400, f"tool_choice.type {kind!r} needs 'tools'", "tool_choice.type", "invalid_value")
    if kind == "tool":
        named = [t for t in all_tools if t.name == choice.get("name")]
        if not named:
            raise ApiError(400, f"tool_choice.name {choice.get('name')!r:.60} is not one of the tools "
                                f"({', '.join(t.name for t in all_tools)})", "tool_choice.name", "invalid_value")
        all_tools, calls = tuple(named), 1
    return tools, Constraint(tools=all_tools, call_required=True, max_calls=calls, first_index=first)


def _thinking(body: dict) -> None:
    t = body.get("thinking")
    if isinstance(t, dict) and t.get("type") not in (None, "disabled"):
        raise ApiError(400, "thinking: extended thinking is not available for this model; leave 'thinking' out "
                            "or set {\"type\": \"disabled\"}", "thinking", "unsupported_value")


def parse_messages(body, served_model: str, need_max_tokens: bool = True) -> ChatRequest:
    """A /v1/messages body (decoded JSON) -> ChatRequest; ApiError(400) naming the field on any bad one.
    need_max_tokens=False for /v1/messages/count_tokens."""
    if not isinstance(body, dict):
        raise bad("body", body, "a JSON object")
    model = get_model(body, served_model)
    max_tokens = get_int(body, "max_tokens", 1)
    if max_tokens is None and need_max_tokens:
        raise bad("max_tokens", None, "an integer >= 1 (required by the Messages API)")
    _thinking(body)
    messages = _messages(body)
    tools, constraint = _constraint(body, _tools(body), messages)
    temperature = body.get("temperature")
    params = sampling_params(_NAMES, 1.0, temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
                             top_p=body.get("top_p"))
    gen = Generation(params, max_tokens, get_stops(body, "stop_sequences"), get_bool(body, "stream"),
                     include_usage=False, top_k=get_int(body, "top_k", 1))
    return ChatRequest(model, messages, tools, gen, constraint)


def stop_reason(res) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished Result."""
    if res.tool_calls:
        return "tool_use", None
    if res.stop_sequence is not None:
        return "stop_sequence", res.stop_sequence
    return ("max_tokens" if res.finish_reason == "length" else "end_turn"), None


def tool_use_block(call: dict) -> dict:
    """A parsed K2 call as a tool_use block; arguments that are not a JSON object come back as a text block
    with the raw call (Anthropic's tool_use needs an object; nothing is dropped)."""
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        args = None
    if not isinstance(args, dict):
        return {"type": "text", "text": f"[tool call {call['id']} with arguments that are not a JSON object: "
                                        f"{fn['arguments']}]"}
    return {"type": "tool_use", "id": anthropic_id(call["id"]), "name": fn["name"], "input": args}


def message_body(meta: dict, res) -> dict:
    """The non-streaming response of /v1/messages."""
    content = ([{"type": "text", "text": res.content}] if res.content else []) + [
        tool_use_block(c) for c in res.tool_calls]
    reason, sequence = stop_reason(res)
    return {**meta, "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": {"input_tokens": res.prompt_tokens - res.cached_tokens, "output_tokens": res.completion_tokens,
                      "cache_read_input_tokens": res.cached_tokens}}
