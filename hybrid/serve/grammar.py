"""Structured output: JSON schemas and K2 tool calls enforced by a token mask at every step (llguidance).

    request -> Constraint (api.py / anthropic.py: which schema or tools, and where in the request they were)
            -> Grammars.compile: one Lark grammar, each schema validated on its own (400 naming its field)
            -> Grammars.mask: a GrammarMask per request, a LogitsProcessor for the engine's Sampler

Why llguidance rather than xgrammar: it builds its token trie straight from a tiktoken Encoding, and K2's
tokenizer is one (hybrid/text/tokenizer.py), so the mask is over the model's own vocabulary; its Lark dialect
names special tokens (`<|tool_call_begin|>`) and embeds JSON schemas (`%json {...}`), so K2's whole
tool-call section is one grammar; keywords it cannot enforce are validation errors (a 400 naming the field,
not a silently looser output); there is no per-schema compile step, so a new schema per request costs
nothing up front; and its wheel has no dependencies (xgrammar 0.2.8 pulls in triton, transformers and
apache-tvm-ffi).

GrammarMask computes the next mask on a helper thread as soon as the chosen token is accepted, so the host
work overlaps the engine's next forward step; __call__ only waits for it and applies it. Near the end of
the token budget it allows only a short way to a complete document (tokens the grammar forces, else the first
one-byte token in a closing order, `"` `}` `]` `0` then the rest, that changes what may follow; inside a string
whose closing quote is not allowed yet, the shortest run of bytes its pattern needs first), so an answer that
reaches max_tokens is closed rather than cut off and still parses. Inside a JSON number the mask also takes out
tokens that would take it past MAX_INT_DIGITS integer or MAX_EXP_DIGITS exponent digits: llguidance's numbers
are unbounded, and json.loads reads `1e400` as inf.
"""
from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import llguidance
import numpy as np
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

from hybrid.serve.errors import ApiError
from hybrid.text.chat import ARG_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END

# json.dumps' separators and no free whitespace: what K2's template renders for tool arguments, and a
# random-weight model cannot wander off into whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_PARALLEL_CALLS = 8         # calls one forced tool-call section may hold
# Ways out of a string, an object, an array, a value. `"` first: inside a string `}` is just a character
# (a loop), while outside one `"` is either not allowed or opens a string that the next `"` closes.
_CLOSING_BYTES = b'"}]0'
_MAX_CLOSING = 256             # tokens a closing path may take before the search gives up
_MAX_TRIES = 16                # candidates tried for one closing token
_MAX_REACH = 512               # masks the search for a string's closing quote may compute (~50 us each)
# Tokens to spare when closing starts: the stop token, and room for free tokens that opened strings or
# containers since the last search (searched again each time half the remaining slack is used).
_MARGIN = 8
# Bounds on every JSON number written (issue 28): |x| < 10^200 * 10^99 stays far inside float range, where an
# unbounded exponent gave `-603145e45201412322`, which json.loads reads as -inf.
MAX_INT_DIGITS = 200
MAX_EXP_DIGITS = 2


@dataclass(frozen=True)
class Schema:
    """A JSON schema and where the request gave it (the `param` named by a 400)."""
    param: str                 # e.g. "response_format.json_schema.schema", "tools[1].function.parameters"
    schema: dict


@dataclass(frozen=True)
class Tool:
    name: str
    params: Schema


@dataclass(frozen=True)
class Constraint:
    """What the output must be. answer: the reply is JSON matching this schema (response_format).
    tools + call_required: the reply is a K2 tool-call section calling these tools (tool_choice "required",
    Anthropic's "any", or one named tool); with an answer and not required, either of the two."""
    answer: Schema | None = None
    tools: tuple[Tool, ...] = ()
    call_required: bool = False
    max_calls: int = MAX_PARALLEL_CALLS
    first_index: int = 0       # K2 numbers calls across the conversation: functions.NAME:IDX


def _json(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def lark(c: Constraint) -> str:
    """The Lark grammar (llguidance's dialect) of a Constraint."""
    section = c.call_required or (bool(c.tools) and c.answer is not None)
    start = "section" if c.call_required else " | ".join(["answer"] + (["section"] if section else []))
    lines = [f"start: {start}"]
    if c.answer is not None and not c.call_required:
        lines.append(f"answer: %json {_json(c.answer.schema)}")
    if section:
        lines.append(f"section: {SECTION_BEGIN} seq0 {SECTION_END}")
        for j in range(c.max_calls):
            more = f" | call{j} seq{j + 1}" if j + 1 < c.max_calls else ""
            lines.append(f"seq{j}: call{j}{more}")
            lines.append(f"call{j}: " + " | ".join(f"call{j}_{t}" for t in range(len(c.tools))))
            for t, tool in enumerate(c.tools):
                call_id = json.dumps(f"functions.{tool.name}:{c.first_index + j}", ensure_ascii=False)
                lines.append(f"call{j}_{t}: {CALL_BEGIN} {call_id} {ARG_BEGIN} args{t} {CALL_END}")
        lines += [f"args{t}: %json {_json(tool.params.schema)}" for t, tool in enumerate(c.tools)]
    return "\n".join(lines) + "\n"


_DONE = Future()
_DONE.set_result(None)


PROBE_STEPS = 4        # tokens Grammars.compile walks to catch schemas the engine fails on when generating


class Grammars:
    """The grammar engine of one tokenizer: llguidance's view of the vocabulary (built once), the helper
    thread that computes masks, and the token order used to close a document.

    n_logits: the model's vocabulary (>= the tokenizer's; ids past the tokenizer are never allowed).
    overlap: compute each next mask on the helper thread while the engine steps (True), or in __call__.
    """

    def __init__(self, tokenizer, n_logits: int, overlap: bool = True):
        self.tokenizer, self.n_logits, self.overlap = tokenizer, n_logits, overlap
        self.stop_ids = tuple(tokenizer.stop_ids)
        self.ll = lltokenizer_from_encoding(tokenizer.encoding, n_vocab=tokenizer.vocab_size,
                                            eos_token=list(self.stop_ids))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hybrid-grammar")
        self.one_byte = self._one_byte_tokens()
        firsts = [tokenizer.token_id(CALL_END), tokenizer.token_id(SECTION_END)] + [
            self.one_byte[b] for b in _CLOSING_BYTES if b in self.one_byte]
        rest = [self.one_byte[b] for b in sorted(self.one_byte, key=lambda b: (not 0x20 <= b < 0x7F, b))]
        self.order = np.array(list(dict.fromkeys(firsts + rest)), dtype=np.int64)   # closing order, see module doc

    def _one_byte_tokens(self) -> dict[int, int]:
        """byte value -> the id of the token that is that single byte (every byte-level BPE has them)."""
        out = {}
        for b in range(256):
            try:
                out[b] = self.tokenizer.encoding.encode_single_token(bytes([b]))
            except KeyError:            # a vocabulary without this byte as a token
                pass
        return out

    def token_bytes(self, token: int) -> bytes | None:
        """The bytes a token adds to a JSON text; None for a special token (a tool-call marker)."""
        return None if self.ll.is_special_token(token) else self.tokenizer.decode_bytes([token])

    def compile(self, c: Constraint) -> str:
        """The validated grammar of c. Raises ApiError(400) naming the schema's field when llguidance cannot
        enforce it (invalid schema, unsupported keyword, unsatisfiable bounds). Takes milliseconds to a
        second for a large schema: call it off the event loop."""
        for s in ([c.answer] if c.answer is not None and not c.call_required else []) + [t.params for t in c.tools]:
            self._check(s)
        grammar = llguidance.LLMatcher.grammar_from_lark(lark(c))
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
        if is_error:
            raise ApiError(400, f"the output constraint cannot be enforced: {messages[0]}", None, "invalid_schema")
        failure = self._probe(grammar)
        if failure is not None:
            param = c.answer.param if c.answer is not None else c.tools[0].params.param if len(c.tools) == 1 \
                else "tools"
            raise ApiError(400, f"{param}: this schema compiles but cannot be enforced: the grammar engine fails on "
                                f"its first tokens ({failure}); make it smaller or less recursive", param,
                           "invalid_schema")
        return grammar

    def _probe(self, grammar: str) -> str | None:
        """Walk the grammar's first PROBE_STEPS tokens, taking the first allowed token that is not whitespace:
        schemas that validate but overflow the engine's limits (hundreds of optional properties, a required
        self-reference) fail here, at compile time, instead of on the request's first token after it was
        accepted. Returns the engine's first error line, or None."""
        m = llguidance.LLMatcher(self.ll, grammar)
        bits = np.zeros((self.ll.vocab_size + 31) // 32, dtype=np.int32)
        space = {self.one_byte[b] for b in b" \t\n\r" if b in self.one_byte}
        for _ in range(PROBE_STEPS):
            m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little"))
            if m.is_error() or not len(allowed):
                break
            token = next((int(a) for a in allowed[:256] if a not in space), int(allowed[0]))
            if not m.consume_token(token) or m.is_stopped():
                break
        return m.get_error().strip().splitlines()[0] if m.is_error() else None

    def _check(self, s: Schema) -> None:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(_json(s.schema))
        except ValueError as e:
            raise ApiError(400, f"{s.param} is not a JSON schema: {e}", s.param, "invalid_schema") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ApiError(400, f"{s.param}: this JSON schema cannot be enforced: {messages[0]}", s.param,
                           "invalid_schema")

    def mask(self, grammar: str, budget: int) -> "GrammarMask":
        """A fresh GrammarMask for one request that may generate `budget` tokens."""
        return GrammarMask(self, grammar, budget)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Number:
    """The JSON number being written: its integer digits so far, and its exponent digits once `e` came."""
    digits: int = 0
    fraction: bool = False
    exponent: int | None = None

    def feed(self, c: int) -> bool:
        """Take byte c; False when c is not part of the number (it ended before c)."""
        if 0x30 <= c <= 0x39:
            if self.exponent is not None:
                self.exponent += 1
            elif not self.fraction:
                self.digits += 1
        elif c == 0x2E:                             # .
            self.fraction = True
        elif c in (0x65, 0x45):                     # e E
            self.exponent = 0
        elif c not in (0x2B, 0x2D):                 # + -
            return False
        return True

    def finite(self) -> bool:
        """Whether the number stays within MAX_INT_DIGITS and MAX_EXP_DIGITS (so float() of it is finite)."""
        return self.digits <= MAX_INT_DIGITS and (self.exponent or 0) <= MAX_EXP_DIGITS


class _JsonNesting:
    """Where a JSON text stands after the bytes seen so far: inside a string or not, the containers still
    open, and the number being written if any. Tells the closing search which closer comes next and the
    mask which tokens would make a number too large; a special token (a tool-call marker) starts a new
    document."""

    def __init__(self):
        self.stack: list[int] = []
        self.in_string = self.escape = False
        self.number: _Number | None = None
        self.too_large = 0                          # bytes written while a number was past _Number.finite

    def copy(self) -> "_JsonNesting":
        c = _JsonNesting()
        c.stack, c.in_string, c.escape = list(self.stack), self.in_string, self.escape
        c.number = replace(self.number) if self.number is not None else None
        c.too_large = self.too_large
        return c

    def feed(self, data: bytes) -> None:
        for c in data:
            if self.number is not None and not self.number.feed(c):
                self.number = None
            if self.number is not None:
                self.too_large += not self.number.finite()
                continue
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == 0x5C:                     # backslash
                    self.escape = True
                elif c == 0x22:
                    self.in_string = False
            elif c == 0x22:
                self.in_string = True
            elif c == 0x2D or 0x30 <= c <= 0x39:   # - or a digit starts a number
                self.number = _Number()
                self.number.feed(c)
            elif c in (0x7B, 0x5B):                 # { [
                self.stack.append(c)
            elif c in (0x7D, 0x5D) and self.stack:
                self.stack.pop()

    def closer(self) -> bytes:
        """The byte that closes the innermost open thing, or b"" at the top level."""
        if self.in_string:
            return b'"'
        return {0x7B: b"}", 0x5B: b"]"}[self.stack[-1]] if self.stack else b""


@dataclass
class MaskTimes:
    """Host seconds a GrammarMask spent, for benchmarks: fill runs on the helper thread (overlapping the
    engine's step); wait is how long __call__ still had to wait for it; closing is the closing search."""
    fill: float = 0.0
    wait: float = 0.0
    apply: float = 0.0
    accept: float = 0.0
    closing: float = 0.0
    tokens: int = 0


class GrammarMask:
    """LogitsProcessor enforcing one compiled grammar for one request (see the module docstring).

    __call__(logits [n_logits] float32, host, modified in place) -> logits with every token the grammar
    forbids at -inf.
    accept(token): advances the grammar; RuntimeError if the token was not allowed (a bug, not bad input).
    """

    def __init__(self, grammars: Grammars, grammar: str, budget: int):
        self.g, self.left = grammars, budget
        self.matcher = llguidance.LLMatcher(grammars.ll, grammar)
        if self.matcher.is_error():
            raise RuntimeError(f"llguidance refused a validated grammar: {self.matcher.get_error()}")
        self.closing: list[int] | None = None        # the tokens that close the document, once it must close
        self._json = _JsonNesting()
        self._bits = np.zeros((grammars.ll.vocab_size + 31) // 32, dtype=np.int32)
        self.times = MaskTimes()
        path = self._closing_path()
        self._check_at = 2 * len(path) + 2 * _MARGIN if path is not None else -1
        self._pending = self._next_mask()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self._wait()
        t1 = time.perf_counter()
        forced = self._forced()
        t2 = time.perf_counter()
        # numpy, one thread: torch's masked_fill_ over 100k logits took 14 ms with 2 threads on a busy
        # 2-core machine (OpenMP contention) against 0.5-0.8 ms here
        x, n = logits.numpy(), self.g.ll.vocab_size
        if forced is not None:
            keep = x[forced]
            x[:] = -np.inf
            x[forced] = keep
        else:
            banned = np.unpackbits(np.invert(self._bits.view(np.uint8)), count=n, bitorder="little").view(np.bool_)
            np.copyto(x[:n], -np.inf, where=banned)
            x[n:] = -np.inf
        self.times.wait += t1 - t0
        self.times.closing += t2 - t1
        self.times.apply += time.perf_counter() - t2
        return logits

    def accept(self, token: int) -> None:
        t0 = time.perf_counter()
        self._wait()
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        self.left -= 1
        _feed(self._json, self.g.token_bytes(token))
        if self.closing:
            self.closing.pop(0)
        self._pending = self._next_mask()
        self.times.accept += time.perf_counter() - t0
        self.times.tokens += 1

    def _next_mask(self):
        """Start computing the mask for the grammar's state now (a Future), or leave it to _wait."""
        return self.g.pool.submit(self._fill) if self.g.overlap else None

    def _wait(self) -> None:
        """The mask for the state now is in self._bits when this returns."""
        if self._pending is None:
            self._fill()
            self._pending = _DONE
        else:
            self._pending.result()

    def _fill(self) -> None:
        """The next mask into self._bits (on the helper thread; llguidance releases the GIL)."""
        t0 = time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._json.number is not None:
            self._keep_finite()
        self.times.fill += time.perf_counter() - t0

    def _keep_finite(self) -> None:
        """Take out of self._bits the tokens that would write a number past float range (_Number.finite):
        the grammar's JSON numbers have no bound on their digits."""
        words = self._bits.view(np.uint32)
        allowed = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:self.g.ll.vocab_size])
        banned = [t for t in allowed.tolist()
                  if _fed(self._json, self.g.token_bytes(t)).too_large > self._json.too_large]
        if banned:
            idx = np.array(banned, dtype=np.int64)
            np.bitwise_and.at(words, idx >> 5, ~np.left_shift(np.uint32(1), (idx & 31).astype(np.uint32)))

    def _forced(self) -> list[int] | None:
        """The only tokens allowed now when the budget forces the document closed, else None."""
        if self.closing is None and 0 <= self.left <= self._check_at:
            path = self._closing_path()
            if path is None:
                self._check_at = -1                 # no way found: plain masking, the answer may be cut
            elif len(path) + _MARGIN >= self.left:
                self.closing = path
            else:    # look again once half the slack is used: a search costs ~15 ms over a 100k vocabulary
                self._check_at = len(path) + _MARGIN + (self.left - len(path) - _MARGIN) // 2
        if self.closing is None:
            return None
        if self.closing:
            return self.closing[:1]
        return list(self.g.stop_ids) if self.matcher.is_accepting() else None

    def _closing_path(self) -> list[int] | None:
        """Tokens that take the grammar from its state now to an accepting one: tokens it forces, else one
        chosen by _closing_token; None when none is found within _MAX_CLOSING tokens."""
        m, nesting, path = self.matcher.deep_copy(), self._json.copy(), []
        while not m.is_accepting():
            if m.is_error() or len(path) >= _MAX_CLOSING:
                return None
            step = m.compute_ff_tokens() or self._closing_token(m, nesting)
            if not step or not m.consume_tokens(step):
                return None
            for t in step:
                _feed(nesting, self.g.token_bytes(t))
            path += step
        return path

    def _closing_token(self, m, nesting: _JsonNesting) -> list[int]:
        """The closer of the innermost open string/object/array if allowed; else the first token in
        Grammars.order that changes what may follow (so `0` inside a number, which only repeats a state,
        is passed over); else the first allowed in that order; else any allowed token but a stop token."""
        before = m.compute_bitmask()
        bits = np.unpackbits(np.frombuffer(before, np.uint8), bitorder="little")
        closer = nesting.closer()
        if closer and bits[self.g.one_byte[closer[0]]]:
            return [self.g.one_byte[closer[0]]]
        if nesting.in_string:
            way = self._reach(m, nesting, bits)
            if way:
                return way
        candidates = [int(t) for t in self.g.order[np.flatnonzero(bits[self.g.order])]]
        for t in candidates[:_MAX_TRIES]:
            trial = m.deep_copy()
            if trial.consume_token(t) and (trial.is_accepting() or trial.compute_bitmask() != before):
                return [t]
        if candidates:
            return candidates[:1]
        other = [int(t) for t in np.flatnonzero(bits[:self.g.ll.vocab_size]) if int(t) not in self.g.stop_ids]
        return other[:1]

    def _reach(self, m, nesting: _JsonNesting, bits: np.ndarray) -> list[int] | None:
        """The shortest run of one-byte tokens from m's state inside a string (its unpacked mask: bits) after
        which the string's closing quote is allowed: the bytes its pattern needs first (`"a$"` needs an `a`).
        Breadth-first over the grammar's states, told apart by their masks, so a byte that only repeats a
        state is not followed (nor one whose effect the mask does not show yet: `"xyz$"` is not found); None
        once _MAX_REACH masks were computed."""
        quote = self.g.one_byte[ord('"')]
        queue, seen, looked = deque([(m, nesting, bits, [])]), {m.compute_bitmask()}, 0
        while queue:
            state, where, allowed, way = queue.popleft()
            steps = [int(t) for t in self.g.order[np.flatnonzero(allowed[self.g.order])]]
            after = {t: _fed(where, self.g.token_bytes(t)) for t in steps}
            done = next((t for t in steps if after[t].closer() == b'"' and not after[t].escape
                         and state.validate_tokens([t, quote]) == 2), None)
            if done is not None:
                return way + [done]
            for t in steps:
                if looked >= _MAX_REACH:
                    return None
                child = state.deep_copy()
                child.consume_token(t)
                key, looked = child.compute_bitmask(), looked + 1
                if key not in seen:
                    seen.add(key)
                    queue.append((child, after[t], np.unpackbits(np.frombuffer(key, np.uint8), bitorder="little"),
                                  way + [t]))
        return None


def _fed(nesting: _JsonNesting, data: bytes | None) -> _JsonNesting:
    """A copy of nesting after data."""
    out = nesting.copy()
    _feed(out, data)
    return out


def _feed(nesting: _JsonNesting, data: bytes | None) -> None:
    if data is None:                    # a tool-call marker: the next JSON document starts afresh
        nesting.__init__()
    else:
        nesting.feed(data)
