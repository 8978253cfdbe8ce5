"""The OpenAI request surface: request bodies validated into frozen requests (pure Python, no web stack).

Every bad field becomes an ApiError naming the field, the value's type and what is accepted. Sampling values
go through SamplingParams (hybrid/core/sampling.py), the one validation `hybrid generate`, the Python API
and both HTTP APIs share; this module adds only OpenAI's own bounds (temperature <= 2). Fields this server
cannot honour (best_of, echo, images) are refused with 400 rather than ignored; fields it does not know
(user, metadata ...) are ignored, as vLLM does.

The requests built here are also what the Anthropic side (anthropic.py) produces, so both APIs share one
path: K2 chat template -> Job -> engine, and one tool-call parser.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from hybrid.core.sampling import MAX_LOGPROBS, SamplingError, SamplingParams
from hybrid.serve.errors import ApiError
from hybrid.serve.grammar import MAX_PARALLEL_CALLS, Constraint, Schema, Tool
from hybrid.text.chat import next_call_index

DEFAULT_TEMPERATURE = 0.6      # Moonshot's recommendation for K2-Instruct (docs/model.md)
MAX_STOP_STRINGS = 16
MAX_N = 16                     # choices per request (each is one more generation in the queue)
MAX_COMPLETION_LOGPROBS = 5    # OpenAI's limit for /v1/completions
_ROLES = ("system", "developer", "user", "assistant", "tool")
_TEXT_PARTS = ("text", "refusal")


@dataclass(frozen=True)
class Generation:
    """How to generate, whichever API asked: sampling (SamplingParams), length, stops, stream, choices."""
    params: SamplingParams
    max_tokens: int | None        # None: up to the end of the context
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    n: int = 1
    top_k: int | None = None      # None: no top-k cut (Anthropic's top_k, vLLM's extension)

    def for_choice(self, i: int) -> SamplingParams:
        """Choice i's sampling: a seeded request with n > 1 gives each choice its own seed (seed + i)."""
        p = self.params
        return p if i == 0 or p.seed is None else replace(p, seed=(p.seed + i) % (1 << 63))


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]          # OpenAI-style; "developer" renamed to "system" (K2 has no such role)
    tools: list[dict] | None      # None when absent, empty, or tool_choice "none"
    generation: Generation
    constraint: Constraint | None = None      # response_format / forced tool calls


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | list[int]       # text (special-token names allowed: the caller builds the template) or ids
    generation: Generation


def type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def bad(param: str, value, wanted: str) -> ApiError:
    return ApiError(400, f"'{param}' must be {wanted}, got {type_name(value)} {value!r:.80}", param, "invalid_type")


TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")   # OpenAI's rule for function names; Anthropic's is the same


def check_tool_name(name: str, param: str) -> None:
    """A tool name the K2 call format can carry (no markers, quotes or lone surrogates); 400 naming `param`."""
    if not TOOL_NAME.fullmatch(name):
        raise ApiError(400, f"'{param}' must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r:.80}", param, "invalid_value")


def get_int(body: dict, key: str, lo: int | None = None, hi: int | None = None, param: str | None = None) -> int | None:
    v, param = body.get(key), param or key
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(param, v, "an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"'{param}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}", param,
                       "invalid_value")
    return v


def get_bool(body: dict, key: str, default: bool = False, param: str | None = None) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(param or key, v, "a boolean")
    return v


def get_model(body: dict, served: str) -> str:
    v = body.get("model")
    if not isinstance(v, str):
        raise bad("model", v, f"a string (this server serves {served!r})")
    if v != served:
        raise ApiError(400, f"The model {v!r} does not exist; this server serves {served!r}", "model",
                       "model_not_found")
    return v


def get_stops(body: dict, key: str = "stop") -> tuple[str, ...]:
    v = body.get(key)
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(key, v, "a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'{key}' has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", key,
                       "invalid_value")
    return tuple(s for s in stops if s)


def sampling_params(names: dict, max_temperature: float, **values) -> SamplingParams:
    """SamplingParams(**values) with the request's own field names in errors (names: field -> param), plus
    the API's own temperature bound."""
    try:
        p = SamplingParams(**{k: v for k, v in values.items() if v is not None})
    except SamplingError as e:
        param = names.get(e.field, e.field)
        raise ApiError(400, str(e).replace(e.field, f"'{param}'", 1), param, "invalid_value") from None
    if p.temperature > max_temperature:
        param = names.get("temperature", "temperature")
        raise ApiError(400, f"'{param}' must be in [0, {max_temperature:g}], got {p.temperature}", param,
                       "invalid_value")
    return p


def _unsupported(body: dict) -> None:
    best_of = get_int(body, "best_of", 1)
    if best_of not in (None, 1):
        raise ApiError(400, f"'best_of' = {best_of} is not supported; send best_of=1", "best_of",
                       "unsupported_value")
    if get_bool(body, "echo"):
        raise ApiError(400, "'echo' is not supported by this server; leave it out", "echo", "unsupported_value")


def _generation(body: dict, logprobs: int | None) -> Generation:
    _unsupported(body)
    max_tokens = get_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", 1)
    stream = get_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("stream_options", opts, 'an object like {"include_usage": true}')
    if opts is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options",
                       "invalid_value")
    params = sampling_params({"logprobs": "top_logprobs"}, 2.0,
                             temperature=_or(body.get("temperature"), DEFAULT_TEMPERATURE), top_p=body.get("top_p"),
                             seed=body.get("seed"), frequency_penalty=body.get("frequency_penalty"),
                             presence_penalty=body.get("presence_penalty"), logprobs=logprobs)
    n = get_int(body, "n", 1, MAX_N)
    return Generation(params, max_tokens, get_stops(body), stream,
                      include_usage=bool(opts and get_bool(opts, "include_usage", param="stream_options.include_usage")),
                      n=n or 1, top_k=get_int(body, "top_k", 1))


def _or(v, default):
    return default if v is None else v


def _chat_logprobs(body: dict) -> int | None:
    """logprobs (bool) + top_logprobs (0..20) -> SamplingParams.logprobs (None: off)."""
    on = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not on:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return (top or 0) if on else None


def _content(m: dict, where: str) -> None:
    """content: a string, a list of text parts, or null (an assistant turn only). The model has no vision or
    audio input: any other part is refused, never silently dropped."""
    content = m.get("content")
    if content is None:
        if m.get("role") != "assistant":
            raise ApiError(400, f"{where}.content is null; a {m.get('role')} message needs content (a string "
                                "or a list of text parts)", f"{where}.content", "invalid_value")
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise bad(f"{where}.content", content, "a string, a list of content parts or null")
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad(at, part, 'a content part like {"type": "text", "text": "..."}')
        kind = part.get("type")
        if kind not in _TEXT_PARTS:
            raise ApiError(400, f"{at}.type {kind!r} is not supported: this model reads text only (no image, "
                                "audio or file input); send text parts", f"{at}.type", "unsupported_value")
        if not isinstance(part.get(kind), str):
            raise bad(f"{at}.{kind}", part.get(kind), "a string")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", msgs, "a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, m, 'an object like {"role": "user", "content": "..."}')
        role = m.get("role")
        if role not in _ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r:.40}",
                           f"{where}.role", "invalid_value")
        _content(m, where)
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise bad(f"{where}.tool_call_id", m.get("tool_call_id"),
                      "the id of the call this result answers (a string, e.g. 'functions.get_weather:0')")
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise bad(f"{where}.tool_calls", m["tool_calls"], "a list of tool calls")
        out.append({**m, "role": "system"} if role == "developer" else m)
    return out


def _tool_list(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", tools, "a list of tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"tools[{i}]", t, '{"type": "function", "function": {"name": ..., "parameters": ...}}')
        check_tool_name(fn["name"], f"tools[{i}].function.name")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", fn["parameters"], "a JSON schema object")
    return tools or None


def _constrained_tools(tools: list[dict]) -> tuple[Tool, ...]:
    """The tools a grammar may call: each needs its parameters schema (the arguments are held to it)."""
    out = []
    for i, t in enumerate(tools):
        fn, param = t["function"], f"tools[{i}].function.parameters"
        if fn.get("parameters") is None:
            raise ApiError(400, f"{param} is missing: a forced tool call (tool_choice 'required' or a named "
                                "function, or response_format with tools) needs each tool's JSON schema; give "
                                '{"type": "object", "properties": {}} for a tool without arguments', param,
                           "missing_schema")
        out.append(Tool(fn["name"], Schema(param, fn["parameters"])))
    return tuple(out)


def _answer_schema(body: dict) -> Schema | None:
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Schema("response_format", {"type": "object"})
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise bad("response_format.json_schema", js, '{"name": ..., "schema": {a JSON schema object}}')
        return Schema("response_format.json_schema.schema", js["schema"])
    raise bad("response_format", rf, '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", ...}')


def _tools_and_constraint(body: dict, messages: list[dict]) -> tuple[list[dict] | None, Constraint | None]:
    tools, choice = _tool_list(body), body.get("tool_choice")
    answer = _answer_schema(body)
    parallel = get_bool(body, "parallel_tool_calls", True)
    first = next_call_index(messages)
    if choice == "none":
        return None, (Constraint(answer=answer) if answer else None)   # tools not shown, output not parsed
    if choice is None or choice == "auto":
        if answer is None:
            return tools, None
        return tools, Constraint(answer=answer, tools=_constrained_tools(tools) if tools else (),
                                 max_calls=MAX_PARALLEL_CALLS if parallel else 1, first_index=first)
    if not tools:
        raise ApiError(400, f"tool_choice {choice!r:.60} needs 'tools'", "tool_choice", "invalid_value")
    if choice == "required":
        return tools, Constraint(tools=_constrained_tools(tools), call_required=True,
                                 max_calls=MAX_PARALLEL_CALLS if parallel else 1, first_index=first)
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad("tool_choice", choice, '"auto", "none", "required" or {"type": "function", "function": {"name": ...}}')
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise ApiError(400, f"tool_choice names {name!r}, which is not in 'tools' "
                            f"({', '.join(t['function']['name'] for t in tools)})", "tool_choice", "invalid_value")
    i = tools.index(named[0])
    return tools, Constraint(tools=(_constrained_tools(tools)[i],), call_required=True, max_calls=1, first_index=first)


def parse_chat(body, served_model: str) -> ChatRequest:
    """A /v1/chat/completions body (decoded JSON) -> ChatRequest; ApiError(400) on any bad field."""
    if not isinstance(body, dict):
        raise bad("body", body, "a JSON object")
    model, messages = get_model(body, served_model), _messages(body)
    tools, constraint = _tools_and_constraint(body, messages)
    return ChatRequest(model, messages, tools, _generation(body, _chat_logprobs(body)), constraint)


def parse_completion(body, served_model: str) -> CompletionRequest:
    """A /v1/completions body (decoded JSON) -> CompletionRequest; ApiError(400) on any bad field."""
    if not isinstance(body, dict):
        raise bad("body", body, "a JSON object")
    model = get_model(body, served_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]       # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            raise bad("prompt", prompt, "a string or a non-empty list of token ids (one prompt per request)")
    elif not isinstance(prompt, str) or not prompt:
        raise bad("prompt", prompt, "a non-empty string or a list of token ids")
    return CompletionRequest(model, prompt, _generation(body, get_int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)))
