"""Kimi K2's chat format: render a conversation, encode it safely, parse tool calls from the output.

Layout (docs/model.md, "Chat template"; Moonshot's chat_template.jinja), with no newlines between turns:
    [<|im_system|>tool_declare<|im_middle|>{tools as compact JSON}<|im_end|>]   only if tools
    [<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>]               if messages[0] is not system
    per message: <|im_user|>{name or role}<|im_middle|>...<|im_end|>             role user
                 <|im_assistant|>{name or role}<|im_middle|>...<|im_end|>        role assistant
                 <|im_system|>{name or role}<|im_middle|>...<|im_end|>           any other role
      assistant with tool_calls: {content}<|tool_calls_section_begin|>
          <|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>...
          <|tool_calls_section_end|>
      tool result: ## Return of {tool_call_id}\n{content}
    [<|im_assistant|>assistant<|im_middle|>]                                     if add_generation_prompt

The model answers ...<|im_end|>; tool calls come as one section, ids `functions.NAME:IDX`.

One builder produces (text, is_control) segments; render_chat joins them into the template's string,
encode_chat maps markers to control ids and encodes everything else with allow_special=False, so a
message that contains "<|im_end|>" cannot end its turn early.
"""
from __future__ import annotations

import json
import re

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."

# Image parts render as this plain text in K2's template; these media names are not registered tokens
# in K2-Instruct. The trailing newline is in what the release's template (rendered by transformers,
# trim_blocks + lstrip_blocks) produces.
IMAGE_PLACEHOLDER = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>\n"

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"

_ROLE_MARKER = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}   # other roles: <|im_system|>

Segment = tuple[str, bool]      # (text, is_control): control segments are special-token names


def _content_text(content, where: str) -> str:
    """A message's content as text: str, None (-> ""), or a list of parts (text concatenated,
    images as IMAGE_PLACEHOLDER)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise TypeError(f"{where}: content must be a str, a list of parts or None, "
                        f"got {type(content).__name__}")
    out = []
    for part in content:
        if not isinstance(part, dict):
            raise TypeError(f"{where}: a content part must be a dict like "
                            f"{{'type': 'text', 'text': ...}}, got {type(part).__name__}")
        if part.get("type") == "image" or "image" in part or "image_url" in part:
            out.append(IMAGE_PLACEHOLDER)
        else:
            out.append(str(part.get("text") or ""))
    return "".join(out)


def _tool_call_segments(calls, where: str) -> list[Segment]:
    segs: list[Segment] = [(SECTION_BEGIN, True)]
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            raise ValueError(f"{where}: tool_calls[{i}] must look like {{'id': 'functions.NAME:{i}', "
                             f"'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}, "
                             f"got {call!r}")
        # An id is normally given (K2's own output ids); without one, use the id K2 would have emitted.
        call_id = call.get("id") or f"functions.{fn['name']}:{i}"
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):      # the template's `tojson`: default separators, raw UTF-8
            args = json.dumps(args, ensure_ascii=False)
        segs += [(CALL_BEGIN, True), (str(call_id), False), (ARG_BEGIN, True), (args, False),
                 (CALL_END, True)]
    segs.append((SECTION_END, True))
    return segs


def chat_segments(messages: list[dict], tools: list[dict] | None = None,
                  add_generation_prompt: bool = True, *, sort_tool_keys: bool = False) -> list[Segment]:
    """The conversation as (text, is_control) segments; see the module docstring for the layout.

    sort_tool_keys: sort the tool schemas' keys recursively before rendering, as the tokenizer code of
    K2 revisions 0905+ does (`deep_sort_dict`); off by default (tools rendered as given).
    """
    if not isinstance(messages, list):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    segs: list[Segment] = []
    if tools:
        if sort_tool_keys:
            tools = json.loads(json.dumps(tools, sort_keys=True))
        decl = json.dumps(tools, separators=(",", ":"), ensure_ascii=False)
        segs += [("<|im_system|>", True), ("tool_declare", False), ("<|im_middle|>", True),
                 (decl, False), ("<|im_end|>", True)]
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        segs += [("<|im_system|>", True), ("system", False), ("<|im_middle|>", True),
                 (DEFAULT_SYSTEM, False), ("<|im_end|>", True)]
    for k, msg in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ValueError(f"{where} must be a dict with a string 'role', got {msg!r}")
        role = msg["role"]
        segs += [(_ROLE_MARKER.get(role, "<|im_system|>"), True), (str(msg.get("name") or role), False),
                 ("<|im_middle|>", True)]
        if role == "tool":
            if msg.get("tool_call_id") is None:
                raise ValueError(f"{where}: a tool result needs 'tool_call_id' (the id of the call it "
                                 "answers, e.g. 'functions.get_weather:0')")
            segs.append((f"## Return of {msg['tool_call_id']}\n"
                         + _content_text(msg.get("content"), where), False))
        else:
            segs.append((_content_text(msg.get("content"), where), False))
            if role == "assistant" and msg.get("tool_calls"):
                segs += _tool_call_segments(msg["tool_calls"], where)
        segs.append(("<|im_end|>", True))
    if add_generation_prompt:
        segs += [("<|im_assistant|>", True), ("assistant", False), ("<|im_middle|>", True)]
    return [(text, ctl) for text, ctl in segs if text]


def render_chat(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt=True,
                *, sort_tool_keys: bool = False) -> str:
    """The prompt string K2's chat template renders for this conversation.

    Example:
        >>> render_chat([{"role": "user", "content": "What is 1+1?"}])
        '<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|><|im_user|>user<|im_middle|>What is 1+1?<|im_end|><|im_assistant|>assistant<|im_middle|>'
    """
    return "".join(text for text, _ in chat_segments(messages, tools, add_generation_prompt,
                                                     sort_tool_keys=sort_tool_keys))


def encode_chat(tok, messages, tools=None, add_generation_prompt=True, *,
                sort_tool_keys: bool = False) -> list[int]:
    """Token ids of the rendered conversation, built piece by piece.

    Template markers become their control ids (tok.token_id); all other text, message content
    included, is encoded with allow_special=False. Adjacent text pieces are joined before encoding,
    so for content without special-token strings the ids equal
    tok.encode(render_chat(...), allow_special=True), i.e. what the release's tokenizer gives.
    """
    ids: list[int] = []
    pending: list[str] = []
    for text, control in chat_segments(messages, tools, add_generation_prompt,
                                       sort_tool_keys=sort_tool_keys):
        if control:
            ids += tok.encode("".join(pending), allow_special=False)
            pending = []
            ids.append(tok.token_id(text))
        else:
            pending.append(text)
    ids += tok.encode("".join(pending), allow_special=False)
    return ids


def next_call_index(messages: list[dict]) -> int:
    """The IDX the next tool call gets in its id `functions.NAME:IDX`: K2 numbers calls from 0 across the
    whole conversation (docs/model.md, "Chat template"), so it is the number of calls in earlier assistant turns."""
    return sum(len(m.get("tool_calls") or []) for m in messages
               if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list))


# One call: id up to the argument marker (no '<|' inside), arguments up to the end marker. The
# arguments may not run into the next call's begin marker, so one broken call does not swallow the next.
_CALL_RE = re.compile(
    re.escape(CALL_BEGIN) + r"\s*(?P<id>(?:(?!<\|).)*?)\s*" + re.escape(ARG_BEGIN)
    + r"\s*(?P<args>(?:(?!" + re.escape(CALL_BEGIN) + r").)*?)\s*" + re.escape(CALL_END), re.DOTALL)
_ID_RE = re.compile(r"^(?:functions\.)?(?P<name>.+?)(?::(?P<index>\d+))?$", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Split K2 output into (content before the tool-call section, OpenAI-style tool calls).

    Each call: {"id": "functions.NAME:IDX" (verbatim), "type": "function",
                "function": {"name": NAME, "arguments": the raw JSON text}}.
    NAME is the id without the optional "functions." prefix and the ":IDX" suffix, so names with '-'
    and '.' survive (vLLM's split('.')[-1] would cut "weather.v2" to "v2"). Arguments are passed on
    as the model wrote them; check them with json.loads before running a tool.

    Never raises on model output: a call without its end marker (output cut off), or without an id,
    is dropped; a missing section end is tolerated; without any tool-call marker the whole text is
    content.

    Example:
        >>> parse_tool_calls('Let me look.<|tool_calls_section_begin|><|tool_call_begin|>'
        ...     'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}'
        ...     '<|tool_call_end|><|tool_calls_section_end|>')[1][0]["function"]
        {'name': 'get_weather', 'arguments': '{"city": "Paris"}'}
    """
    if not isinstance(text, str):
        return "", []
    starts = [i for i in (text.find(SECTION_BEGIN), text.find(CALL_BEGIN)) if i >= 0]
    if not starts:
        return text, []
    start = min(starts)
    content, section = text[:start], text[start:]
    end = section.find(SECTION_END)
    if end >= 0:
        section = section[:end]
    calls = []
    for m in _CALL_RE.finditer(section):
        call_id = m.group("id").strip()
        ident = _ID_RE.match(call_id)
        if not call_id or ident is None:
            continue
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": ident.group("name"), "arguments": m.group("args")}})
    return content, calls
