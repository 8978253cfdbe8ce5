"""The OpenAI request surface: validation of request bodies into frozen requests, and the error shape.

Pure Python (no web stack, no torch). Every bad field becomes an ApiError naming the field, the value's
type and what is accepted, returned to the client as OpenAI's error object:
    {"error": {"message": ..., "type": "invalid_request_error", "param": "temperature", "code": ...}}
Fields this server cannot honour (n > 1, logprobs, tool_choice "required") are refused with 400 rather
than silently ignored; fields it does not know (user, metadata, penalties ...) are ignored, as vLLM does.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TEMPERATURE = 0.6      # Moonshot's recommendation for K2-Instruct (K2-REFERENCE §5)
MAX_STOP_STRINGS = 16
_ROLES = ("system", "developer", "user", "assistant", "tool")
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)      # what torch.Generator.manual_seed accepts


class ApiError(Exception):
    """An error for the client, in OpenAI's shape; status is the HTTP status code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None        # None: up to the end of the context
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]          # roles checked; "developer" renamed to "system" (K2 has no such role)
    tools: list[dict] | None      # None when absent, empty, or tool_choice "none"
    sampling: Sampling


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | list[int]       # text (special-token names allowed: the caller builds the template) or ids
    sampling: Sampling


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _bad(param: str, value, wanted: str) -> ApiError:
    return ApiError(400, f"'{param}' must be {wanted}, got {_type_name(value)} {value!r:.80}", param,
                    "invalid_type")


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open=False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(key, v, "a number")
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise ApiError(400, f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key,
                       "invalid_value")
    return float(v)


def _int(body: dict, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(key, v, "an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"'{key}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}", key,
                       "invalid_value")
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(key, v, "a boolean")
    return v


def _model(body: dict, served: str) -> str:
    v = body.get("model")
    if not isinstance(v, str):
        raise _bad("model", v, f"a string (this server serves {served!r})")
    if v != served:
        raise ApiError(400, f"The model {v!r} does not exist; this server serves {served!r}", "model",
                       "model_not_found")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", v, "a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop",
                       "invalid_value")
    return tuple(s for s in stops if s)


def _unsupported(body: dict) -> None:
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, f"'n' = {n} is not supported: this server returns one choice per request; "
                       "send n=1 or several requests", "n", "unsupported_value")
    best_of = _int(body, "best_of", 1)
    if best_of not in (None, 1):
        raise ApiError(400, f"'best_of' = {best_of} is not supported; send best_of=1", "best_of",
                       "unsupported_value")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise ApiError(400, "'logprobs' is not supported by this server; leave it out", "logprobs",
                       "unsupported_value")
    if _bool(body, "echo"):
        raise ApiError(400, "'echo' is not supported by this server; leave it out", "echo", "unsupported_value")


def _sampling(body: dict) -> Sampling:
    _unsupported(body)
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options", opts, 'an object like {"include_usage": true}')
    if opts is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options",
                       "invalid_value")
    return Sampling(max_tokens=max_tokens,
                    temperature=_number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                    seed=_int(body, "seed", *_SEED_RANGE), stop=_stop(body), stream=stream,
                    include_usage=bool(opts and _bool(opts, "include_usage")))


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", msgs, "a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, m, 'an object like {"role": "user", "content": "..."}')
        role = m.get("role")
        if role not in _ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r:.40}",
                           f"{where}.role", "invalid_value")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _bad(f"{where}.content", content, "a string, a list of content parts or null")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise _bad(f"{where}.tool_call_id", m.get("tool_call_id"),
                       "the id of the call this result answers (a string, e.g. 'functions.get_weather:0')")
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise _bad(f"{where}.tool_calls", m["tool_calls"], "a list of tool calls")
        out.append({**m, "role": "system"} if role == "developer" else m)
    return out


def _tools(body: dict) -> list[dict] | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", tools, "a list of tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise _bad(f"tools[{i}]", t, '{"type": "function", "function": {"name": ..., "parameters": ...}}')
    if choice is None or choice == "auto":
        return tools or None
    if choice == "none":
        return None              # the model is not told about tools, and its output is not parsed
    if choice == "required" or isinstance(choice, dict):
        raise ApiError(400, "tool_choice 'required' or a named function needs constrained decoding, which "
                       "this server does not have; use 'auto' (or 'none')", "tool_choice", "unsupported_value")
    raise _bad("tool_choice", choice, "'auto' or 'none'")


def parse_chat(body, served_model: str) -> ChatRequest:
    """A /v1/chat/completions body (decoded JSON) -> ChatRequest; ApiError(400) on any bad field."""
    if not isinstance(body, dict):
        raise _bad("body", body, "a JSON object")
    return ChatRequest(model=_model(body, served_model), messages=_messages(body), tools=_tools(body),
                       sampling=_sampling(body))


def parse_completion(body, served_model: str) -> CompletionRequest:
    """A /v1/completions body (decoded JSON) -> CompletionRequest; ApiError(400) on any bad field."""
    if not isinstance(body, dict):
        raise _bad("body", body, "a JSON object")
    model = _model(body, served_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]       # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            raise _bad("prompt", prompt, "a string or a non-empty list of token ids (one prompt per request)")
    elif not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", prompt, "a non-empty string or a list of token ids")
    return CompletionRequest(model=model, prompt=prompt, sampling=_sampling(body))
