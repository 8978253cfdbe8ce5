"""Structured output and the OpenAI fields agents use (issue 16), with the official `openai` client against a
live server over the tiny random-weight model: its text is noise, so whatever parses was made to parse."""
from __future__ import annotations

import json
import math
import re

import jsonschema
import openai
import pytest
import torch

from hybrid.core.sampling import SamplingParams
from hybrid.serve.grammar import MAX_INT_DIGITS, Constraint, Grammars, Schema, Tool, lark
from hybrid.text.chat import encode_chat, parse_tool_calls
from test_server import CHAT, MODEL, client, real, tiny  # noqa: F401  (real, tiny: fixtures)

NESTED = {"type": "object", "additionalProperties": False, "required": ["name", "point", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 12},
    "point": {"type": "object", "required": ["x", "y"], "properties": {"x": {"type": "integer"},
                                                                       "y": {"type": "integer"}}},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"], "properties": {
    "city": {"type": "string", "maxLength": 16}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather-v2", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "time_now", "parameters": {"type": "object", "properties": {},
                                                                                "additionalProperties": False}}}]


# ---- the grammar on its own (no model): every seeded random walk ends in a valid document ---------------
def _walk(tiny, grammars: Grammars, grammar: str, budget: int, seed: int, bias: torch.Tensor | None = None) -> str:
    """The text of one seeded walk under the grammar's mask with random logits (plus bias), stopped at a stop
    token or the budget (the mask must have closed the document by then)."""
    tok, gen, mask, out = tiny.tokenizer, torch.Generator().manual_seed(seed), grammars.mask(grammar, budget), []
    while len(out) < budget:
        logits = mask(torch.randn(tiny.cfg.vocab_size, generator=gen) * 3 + (0 if bias is None else bias))
        t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        out.append(t)
        if t in tok.stop_ids:
            break
        mask.accept(t)
    return tok.decode(out, skip_special=True)


@pytest.mark.parametrize("constraint,budget", [
    (Constraint(answer=Schema("rf", {"type": "object"})), 24),
    (Constraint(answer=Schema("rf", NESTED)), 48),
    (Constraint(tools=tuple(Tool(t["function"]["name"], Schema("p", t["function"]["parameters"]))
                            for t in TOOLS), call_required=True, first_index=2), 64),
    (Constraint(answer=Schema("rf", NESTED), tools=(Tool("time_now", Schema("p", {"type": "object"})),)), 48),
])
@pytest.mark.parametrize("overlap", [True, False])
def test_mask_and_closing_keep_random_logits_valid(tiny, constraint, budget, overlap):
    tok = tiny.tokenizer
    grammars = Grammars(tok, tiny.cfg.vocab_size, overlap=overlap)
    grammar = grammars.compile(constraint)
    for seed in range(20):
        text = _walk(tiny, grammars, grammar, budget, seed)
        if constraint.call_required or text.startswith("<|tool_calls_section_begin|>"):
            content, calls = parse_tool_calls(text)
            assert content == "" and calls, text
            for k, call in enumerate(calls):
                assert call["id"] == f"functions.{call['function']['name']}:{constraint.first_index + k}"
                schema = next(t.params.schema for t in constraint.tools if t.name == call["function"]["name"])
                jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
        else:
            jsonschema.validate(json.loads(text), constraint.answer.schema)
    grammars.close()


PATTERNED = {"type": "object", "required": ["id", "n", "day"], "additionalProperties": False, "properties": {
    "id": {"type": "string", "pattern": "(a+)+$"}, "n": {"type": "integer"},
    "day": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}}


@pytest.mark.parametrize("schema,budgets", [({"type": "string", "pattern": "a$"}, (4, 7, 12)),
                                            ({"type": "string", "pattern": "(a+)+$"}, (4, 7, 12)),
                                            ({"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"}, (12, 16)),
                                            (PATTERNED, (40, 56))])
def test_pattern_strings_are_closed_not_cut_at_the_budget(tiny, schema, budgets):
    # issue 28 item 10: the closing search gave up inside a string whose pattern needs bytes before the quote
    grammars = Grammars(tiny.tokenizer, tiny.cfg.vocab_size, overlap=False)
    grammar = grammars.compile(Constraint(answer=Schema("rf", schema)))
    for budget in budgets:
        for seed in range(12):
            jsonschema.validate(json.loads(_walk(tiny, grammars, grammar, budget, seed)), schema)
    grammars.close()


NUMBERS = {"type": "object", "required": ["x", "ys"], "properties": {
    "x": {"type": "number"}, "ys": {"type": "array", "items": {"type": "number"}, "minItems": 1}}}


@pytest.mark.parametrize("schema,budget", [({"type": "number"}, 16), ({"type": "number"}, 400), (NUMBERS, 48),
                                           (NUMBERS, 400)])
@pytest.mark.parametrize("digits_first", [False, True])
def test_generated_numbers_stay_finite(tiny, schema, budget, digits_first):
    # issue 28: {"type": "number"} gave -603145e45201412322 (json.loads: -inf); digits_first favours digit
    # tokens, so long walks write integer parts up to the mask's bound
    tok = tiny.tokenizer
    bias = torch.tensor([8.0 * (digits_first and bool(b) and set(b) <= set(b"0123456789"))
                         for b in (tok.decode_bytes([t]) if t < tok.vocab_size else b"" for t in
                                   range(tiny.cfg.vocab_size))])
    grammars = Grammars(tok, tiny.cfg.vocab_size, overlap=False)
    grammar = grammars.compile(Constraint(answer=Schema("rf", schema)))
    longest = 0
    for seed in range(10):
        numbers: list[str] = []
        text = _walk(tiny, grammars, grammar, budget, seed, bias)
        jsonschema.validate(json.loads(text, parse_int=lambda x: numbers.append(x) or int(x),
                                       parse_float=lambda x: numbers.append(x) or float(x)), schema)
        assert numbers and all(math.isfinite(float(x)) for x in numbers), text
        longest = max([longest] + [len(re.match(r"-?([0-9]*)", x)[1]) for x in numbers])
    assert longest == MAX_INT_DIGITS if digits_first and budget == 400 else longest < MAX_INT_DIGITS
    grammars.close()


def test_lark_of_a_forced_call_names_k2_markers_and_ids():
    g = lark(Constraint(tools=(Tool("f", Schema("p", {"type": "object"})),), call_required=True, max_calls=1,
                        first_index=4))
    assert "<|tool_calls_section_begin|> seq0 <|tool_calls_section_end|>" in g
    assert '<|tool_call_begin|> "functions.f:4" <|tool_call_argument_begin|> args0 <|tool_call_end|>' in g


# ---- live server, official client -----------------------------------------------------------------------
def test_json_mode_always_parses(real):
    c = client(real)
    for seed in range(20):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"JSON please {seed}"}],
                                      response_format={"type": "json_object"}, max_tokens=24, temperature=1.0,
                                      seed=seed)
        jsonschema.validate(json.loads(r.choices[0].message.content), {"type": "object"})


def test_nested_json_schema_always_parses_and_validates(real):
    c = client(real)
    rf = {"type": "json_schema", "json_schema": {"name": "record", "schema": NESTED, "strict": True}}
    for seed in range(20):
        r = c.chat.completions.create(model=MODEL, messages=CHAT, response_format=rf, max_tokens=48,
                                      temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(r.choices[0].message.content), NESTED)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather-v2"}}])
def test_forced_tool_call_is_schema_valid(real, choice):
    c = client(real)
    history = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.time_now:0", "type": "function", "function": {"name": "time_now", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "functions.time_now:0", "content": "12:00"}]
    for seed in range(4):
        r = c.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice=choice,
                                      max_tokens=64, temperature=1.0, seed=seed)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls and not msg.content
        for k, call in enumerate(msg.tool_calls):
            assert call.id == f"functions.{call.function.name}:{1 + k}"       # K2 counts calls from the history
            schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), schema)
        if isinstance(choice, dict):
            assert [t.function.name for t in msg.tool_calls] == ["get_weather-v2"]


def test_forced_tool_call_streams_its_arguments(real):
    chunks = list(client(real).chat.completions.create(
        model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=64, temperature=1.0, seed=3, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather-v2"}}))
    calls = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert calls[0].id == "functions.get_weather-v2:0" and calls[0].function.name == "get_weather-v2"
    jsonschema.validate(json.loads("".join(tc.function.arguments or "" for tc in calls)), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("extra,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 2}}}}, "response_format.json_schema.schema", "minimum"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "schema"),
    # issue 28 item 3: schemas that validate but failed on the first token, after acceptance (a 500)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(600)}}}}},
     "response_format.json_schema.schema", "cannot be enforced"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}},
        "$ref": "#/$defs/a"}}}}, "response_format.json_schema.schema", "cannot be enforced"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_object"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
     "tools[0].function.parameters", "is missing"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters", "not"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"top_logprobs": 3}, "top_logprobs", "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "21"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]"),
])
def test_bad_structured_requests_are_400_naming_the_field(real, extra, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client(real).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, **extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param and words in e.value.body["message"]


# ---- the small OpenAI gaps ------------------------------------------------------------------------------
def test_penalties_and_top_k_are_applied_as_the_engine_does(real, tiny):
    c = client(real)
    kw = dict(model=MODEL, messages=CHAT, max_tokens=32, temperature=0)
    want = SamplingParams(frequency_penalty=1.5, presence_penalty=0.5)
    out = tiny.generate(encode_chat(tiny.tokenizer, CHAT), 32, sampling=want)
    r = c.chat.completions.create(**kw, frequency_penalty=1.5, presence_penalty=0.5)
    assert r.choices[0].message.content == tiny.tokenizer.decode(out, skip_special=True)
    plain = c.chat.completions.create(**kw).choices[0].message.content
    assert plain != r.choices[0].message.content            # the penalties did change the greedy path
    top1 = c.chat.completions.create(**{**kw, "temperature": 1.5}, seed=9, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == plain          # top_k=1 at any temperature is greedy


def _reference(tiny, ids, n):
    """(token bytes, log-probabilities) of the engine's greedy continuation, stop tokens left out."""
    new = tiny.generate(ids, n)
    lp = torch.log_softmax(tiny.forward(ids + new), -1)
    keep = [(i, t) for i, t in enumerate(new) if t not in set(tiny.default_stop_ids())]
    return ([tiny.tokenizer.decode_bytes([t]) for _, t in keep],
            [float(lp[len(ids) - 1 + i, t]) for i, t in keep])


def test_chat_logprobs_match_the_sampled_tokens(real, tiny):
    r = client(real).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    for t in content:                                        # greedy: the chosen token is the most likely one
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    want_bytes, want_lp = _reference(tiny, encode_chat(tiny.tokenizer, CHAT), 10)
    assert [bytes(t.bytes) for t in content] == want_bytes
    assert [t.logprob for t in content] == pytest.approx(want_lp, abs=1e-4)


def test_completion_logprobs_and_streamed_logprobs(real, tiny):
    c = client(real)
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    want_bytes, want_lp = _reference(tiny, tiny.tokenizer.encode("Once upon a time", allow_special=True), 8)
    assert lp.tokens == [b.decode("utf-8", "replace") for b in want_bytes] and len(lp.top_logprobs[0]) <= 2
    assert lp.token_logprobs == pytest.approx(want_lp, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    full = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True)
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                            logprobs=True, stream=True))
    streamed = [t.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert streamed == [t.logprob for t in full.choices[0].logprobs.content] and streamed


def test_n_choices_are_seeded_per_choice(real):
    c = client(real)
    kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0)
    r = c.chat.completions.create(**kw, n=3, seed=40)
    texts = [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert texts == [c.chat.completions.create(**kw, seed=40 + i).choices[0].message.content for i in range(3)]
    assert r.usage.completion_tokens == sum(
        c.chat.completions.create(**kw, seed=40 + i).usage.completion_tokens for i in range(3))
    chunks = list(c.chat.completions.create(**kw, n=2, seed=40, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
                for i in range(2)]
    assert streamed == texts[:2] and chunks[-1].usage.completion_tokens > 0


def test_logprobs_under_a_grammar_leave_out_forbidden_alternatives(real):
    r = client(real).chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, temperature=0, logprobs=True, top_logprobs=20,
        response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}})
    assert r.choices[0].message.content in ("true", "false")
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) < 20 for t in content)     # only allowed tokens are listed
    assert all(alt.logprob > float("-inf") for t in content for alt in t.top_logprobs)
