"""Streaming text processing for the server: stop strings and K2 tool calls, fed one text piece at a time.

Pure Python (no torch, no web stack), so the whole streaming logic is tested by splitting a text at every
position. Both classes are push-based: push(piece) returns what may be sent now; finish() returns the rest.

    generated ids -> StreamDecoder (complete UTF-8 only) -> StopMatcher -> ToolCallStream -> events

Pieces of ToolCallStream (Piece):
    Content(text)                      text before the tool-call section
    CallStart(index, id, name)         a call's header, sent as soon as its id is complete
    CallArgs(index, text)              a chunk of that call's arguments (concatenated by the client)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from hybrid.text.chat import ARG_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END



@dataclass(frozen=True)
class Content:
    """Answer text before the tool-call section."""
    text: str


@dataclass(frozen=True)
class CallStart:
    """A tool call's header: its index in the answer, its K2 id and the function name."""
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArgs:
    """A chunk of call `index`'s arguments (the client concatenates them)."""
    index: int
    text: str


Piece = Union[Content, CallStart, CallArgs]


# Same rule as chat.parse_tool_calls: optional "functions." prefix, optional ":IDX" suffix; everything
# between is the name, so "functions.get-weather.v2:0" -> "get-weather.v2".
_ID_RE = re.compile(r"^(?:functions\.)?(?P<name>.+?)(?::(?P<index>\d+))?$", re.DOTALL)


def tool_name(call_id: str) -> str | None:
    """The function name in a K2 call id (`functions.NAME:IDX`), or None for an empty id."""
    m = _ID_RE.match(call_id)
    return m.group("name") if call_id and m else None


def _partial_suffix(text: str, markers) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of the markers."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class StopMatcher:
    """OpenAI `stop` strings over streamed text: the text up to (not including) the first stop string.

    Holds back a tail that could still become a stop string, so nothing after a stop is ever sent.

    Example:
        >>> m = StopMatcher(["END"])
        >>> m.push("abcE"), m.push("ND tail"), m.stopped
        ('abc', '', True)
    """

    def __init__(self, stops=()):
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self.matched: str | None = None     # the stop string that ended the text (Anthropic reports it)
        self._held = ""

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self.stopped, self._held = True, ""
            return text[:at]
        keep = _partial_suffix(text, self.stops)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> str:
        out, self._held = self._held, ""
        return "" if self.stopped else out


# States of ToolCallStream
_CONTENT, _BETWEEN, _ID, _ARGS, _DONE = range(5)


class ToolCallStream:
    """Incremental twin of chat.parse_tool_calls: K2 output text in, OpenAI-style stream events out.

    The events of the completed calls add up to parse_tool_calls of the whole text, however the text
    is split: the same content, ids, names and arguments (whitespace around the arguments dropped, text
    after the section end ignored). A call broken off before its end marker (output cut at max_tokens,
    a malformed call) has already been announced, with part of its arguments, when that shows; it is
    not in `completed`, and parse_tool_calls drops it.

    Example:
        >>> s = ToolCallStream()
        >>> s.push("Hi<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
        ...        "<|tool_call_argument_begin|>{}<|tool_call_end|>")
        [('content', 'Hi'), ('call', 0, 'functions.f:0', 'f'), ('args', 0, '{}')]
    """

    def __init__(self):
        self.calls = 0          # calls announced
        self.completed: list[int] = []      # indices of calls whose end marker was seen
        self._state, self._buf, self._args_started = _CONTENT, "", False

    def push(self, piece: str) -> list[Piece]:
        self._buf += piece
        events: list[Piece] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Piece]:
        """End of output: content held back (a possible marker start) is sent; a partial call is not."""
        events = [Content(self._buf)] if self._state == _CONTENT and self._buf else []
        self._buf, self._state = "", _DONE
        return events

    # One transition; returns True when it consumed something and should run again.
    def _step(self, events: list) -> bool:
        buf = self._buf
        if self._state == _CONTENT:
            starts = [i for i in (buf.find(SECTION_BEGIN), buf.find(CALL_BEGIN)) if i >= 0]
            cut = min(starts) if starts else len(buf) - _partial_suffix(buf, (SECTION_BEGIN, CALL_BEGIN))
            if cut:
                events.append(Content(buf[:cut]))
            self._buf = buf[cut:]
            if not starts:
                return False
            self._state = _BETWEEN
            return True
        if self._state == _BETWEEN:      # inside the section, looking for the next call
            i, j = buf.find(CALL_BEGIN), buf.find(SECTION_END)
            if j >= 0 and (i < 0 or j < i):
                self._buf, self._state = "", _DONE
                return False
            if i < 0:
                keep = _partial_suffix(buf, (CALL_BEGIN, SECTION_END))
                self._buf = buf[len(buf) - keep:] if keep else ""
                return False
            self._buf, self._state = buf[i + len(CALL_BEGIN):], _ID
            return True
        if self._state == _ID:           # the id: no "<|" inside, ends at the argument marker
            i = buf.find("<|")
            if i < 0:
                return False
            rest = buf[i:]
            if rest.startswith(ARG_BEGIN):
                name = tool_name(buf[:i].strip())
                if name is None:         # parse_tool_calls drops a call without an id
                    self._buf, self._state = rest, _BETWEEN
                    return True
                events.append(CallStart(self.calls, buf[:i].strip(), name))
                self.calls += 1
                self._buf, self._state, self._args_started = rest[len(ARG_BEGIN):], _ARGS, False
                return True
            if ARG_BEGIN.startswith(rest):
                return False             # the marker may still be arriving
            self._buf, self._state = rest, _BETWEEN     # broken call: look for the next one
            return True
        if self._state == _ARGS:
            return self._args(buf, events)
        self._buf = ""
        return False

    def _args(self, buf: str, events: list) -> bool:
        if not self._args_started:
            buf = self._buf = buf.lstrip()
            if not buf:
                return False
        hits = [(i, m) for m in (CALL_END, CALL_BEGIN, SECTION_END) if (i := buf.find(m)) >= 0]
        if hits:
            i, marker = min(hits)
            if marker == CALL_END:
                self._emit_args(buf[:i].rstrip(), events)
                self.completed.append(self.calls - 1)
                self._buf, self._state = buf[i + len(CALL_END):], _BETWEEN
            else:    # a call broken by the next call or the section end: parse_tool_calls drops it
                self._buf, self._state = buf[i:], _BETWEEN
            return True
        # Hold back a possible marker start and trailing whitespace (stripped if the end marker follows).
        keep = _partial_suffix(buf, (CALL_END, CALL_BEGIN, SECTION_END))
        body, tail = buf[:len(buf) - keep], buf[len(buf) - keep:]
        sendable = body.rstrip()
        self._emit_args(sendable, events)
        self._buf = body[len(sendable):] + tail
        return False

    def _emit_args(self, text: str, events: list) -> None:
        if text:
            events.append(CallArgs(self.calls - 1, text))
            self._args_started = True
