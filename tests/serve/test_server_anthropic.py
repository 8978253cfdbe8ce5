"""Anthropic's Messages API (issue 16), driven by the official `anthropic` client: the same K2 template, engine
and tool-call parser as the OpenAI side; streaming in Anthropic's events; errors in Anthropic's shape."""
from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest

from hybrid.serve.anthropic import anthropic_id, k2_id
from hybrid.text.chat import encode_chat, render_chat
from test_server import MODEL, TOOL_OUTPUT, client, fake, fake_server, real, tiny  # noqa: F401  (fixtures)

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"], "properties": {
    "city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"name": "get_weather-v2", "description": "Weather in a city", "input_schema": WEATHER},
         {"name": "time_now", "input_schema": {"type": "object", "properties": {}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def claude(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=60)


def test_tool_ids_travel_in_anthropic_form():
    for k2 in ("functions.get_weather-v2:0", "functions.time_now:12"):
        aid = anthropic_id(k2)
        assert aid.startswith("toolu_") and all(ch.isalnum() or ch in "_-" for ch in aid)
        assert k2_id(aid) == k2
    assert k2_id("toolu_01A09q90qw90lq917835lq9") == "toolu_01A09q90qw90lq917835lq9"   # made elsewhere


def test_text_answer_equals_the_openai_side(real, tiny):
    msg = claude(real).messages.create(model=MODEL, max_tokens=12, system="Be brief.", messages=ASK,
                                      extra_body={"temperature": 0})
    chat = client(real).chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                               messages=[{"role": "system", "content": "Be brief."}, *ASK])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == chat.choices[0].message.content
    assert msg.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                 chat.usage.completion_tokens)
    count = claude(real).messages.count_tokens(model=MODEL, system="Be brief.", messages=ASK)
    assert count.input_tokens == len(encode_chat(tiny.tokenizer, [{"role": "system", "content": "Be brief."}, *ASK]))


def test_stop_sequence_is_reported(real):
    c = claude(real)
    sampling = {"temperature": 0, "top_p": 0.95}
    full = c.messages.create(model=MODEL, max_tokens=24, messages=ASK, extra_body=sampling)
    text = full.content[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = c.messages.create(model=MODEL, max_tokens=24, messages=ASK, stop_sequences=["never-there", stop],
                            extra_body=sampling)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[:text.index(stop)]


def _forced(c: anthropic.Anthropic, messages, **sampling):
    return c.messages.create(model=MODEL, max_tokens=64, messages=messages, tools=TOOLS,
                             tool_choice={"type": "tool", "name": "get_weather-v2"},
                             extra_body={"temperature": 1.0, **sampling})


def test_forced_tool_round_trip_on_the_random_model(real):
    c = claude(real)
    first = _forced(c, ASK)
    uses = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather-v2"
    jsonschema.validate(uses[0].input, WEATHER)
    assert k2_id(uses[0].id) == "functions.get_weather-v2:0"
    convo = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "21 C"}]}]
    second = _forced(c, convo)
    again = [b for b in second.content if b.type == "tool_use"]
    assert k2_id(again[0].id) == "functions.get_weather-v2:1"       # K2 numbers calls across the conversation
    answer = c.messages.create(model=MODEL, max_tokens=8, messages=convo, tools=TOOLS, extra_body={"top_k": 20})
    # the random model's answer may be only special tokens (no text block), but it is a well-formed answer
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use") and answer.usage.output_tokens > 0
    assert all(b.type in ("text", "tool_use") for b in answer.content)


def test_streaming_tool_call_equals_non_streaming(real):
    c = claude(real)
    plain = _forced(c, ASK, temperature=0)
    kinds = []
    with c.messages.stream(model=MODEL, max_tokens=64, messages=ASK, tools=TOOLS, extra_body={"temperature": 0},
                           tool_choice={"type": "tool", "name": "get_weather-v2"}) as s:
        for ev in s:
            kinds.append(ev.type)
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in plain.content]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == plain.usage.output_tokens


def test_scripted_tool_round_trip_renders_k2_history(fake, tiny):
    real, engine = fake
    engine.reset()
    engine.script = TOOL_OUTPUT
    c = claude(real)
    first = c.messages.create(model=MODEL, max_tokens=100, messages=ASK, tools=TOOLS)
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use", "tool_use"]
    assert first.content[0].text == "Let me check."
    weather, now = first.content[1], first.content[2]
    assert (weather.name, weather.input, now.name, now.input) == (
        "get_weather-v2", {"city": "Paris", "unit": "celsius"}, "time_now", {})
    engine.script = "It is 21 degrees."
    convo = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": weather.id, "content": [{"type": "text", "text": "21 C"}]},
                 {"type": "tool_result", "tool_use_id": now.id, "content": "12:00", "is_error": False},
                 {"type": "text", "text": "Thanks"}]}]
    answer = c.messages.create(model=MODEL, max_tokens=100, messages=convo, tools=TOOLS)
    assert answer.content[0].text == "It is 21 degrees." and answer.stop_reason == "end_turn"
    openai_tools = [{"type": "function", "function": {"name": t["name"], **({"description": t["description"]}
                     if "description" in t else {}), "parameters": t["input_schema"]}} for t in TOOLS]
    same = [*ASK, {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "functions.get_weather-v2:0", "type": "function",
         "function": {"name": "get_weather-v2", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "functions.time_now:1", "type": "function", "function": {"name": "time_now", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather-v2:0", "content": "21 C"},
            {"role": "tool", "tool_call_id": "functions.time_now:1", "content": "12:00"},
            {"role": "user", "content": "Thanks"}]
    assert tiny.tokenizer.decode(engine.prompts[-1]) == render_chat(same, openai_tools)


def test_scripted_tool_call_streams_input_json_deltas(fake):
    real, engine = fake
    engine.reset()
    engine.script = TOOL_OUTPUT
    with claude(real).messages.stream(model=MODEL, max_tokens=100, messages=ASK, tools=TOOLS) as s:
        events = list(s)
        final = s.get_final_message()
    partial = [ev.delta.partial_json for ev in events
               if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta" and ev.index == 1]
    assert len(partial) > 1 and json.loads("".join(partial)) == {"city": "Paris", "unit": "celsius"}
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[1].input == {"city": "Paris", "unit": "celsius"}


@pytest.mark.parametrize("body,field", [
    ({"messages": ASK}, "max_tokens"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages.0.content.0.type"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages.0.content.0"),
    ({"max_tokens": 4, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_x", "name": "f", "input": "not an object"}]}]},
     "messages.0.content.0.input"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages.0.content.0.tool_use_id"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"max_tokens": 4, "messages": ASK, "tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"max_tokens": 4, "messages": ASK, "tools": [{"name": "f", "input_schema": {"type": "foo"}}],
      "tool_choice": {"type": "any"}}, "tools.0.input_schema"),
    ({"max_tokens": 4, "messages": ASK, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
     "tool_choice.name"),
    ({"max_tokens": 4, "messages": ASK, "temperature": 1.5}, "temperature"),
    ({"max_tokens": 4, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"max_tokens": 4, "messages": ASK, "system": [{"type": "image"}]}, "system.0"),
])
def test_bad_messages_requests_are_400_in_anthropic_shape(real, body, field):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude(real).post("/v1/messages", body={"model": MODEL, **body}, cast_to=object)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "error"
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"].startswith(field), err


def test_wrong_model_and_unknown_path(real):
    with pytest.raises(anthropic.BadRequestError, match="does not exist"):
        claude(real).messages.create(model="claude-sonnet-4", max_tokens=4, messages=ASK)
    with pytest.raises(anthropic.NotFoundError) as e:
        claude(real).post("/v1/messages/nope", body={}, cast_to=object)
    assert e.value.body["error"]["type"] == "not_found_error"


def test_output_config_json_schema_holds_the_answer(real):
    schema = {"type": "object", "required": ["answer", "sure"], "additionalProperties": False, "properties": {
        "answer": {"type": "string", "maxLength": 20}, "sure": {"type": "boolean"}}}
    c = claude(real)
    for _ in range(5):
        msg = c.messages.create(model=MODEL, max_tokens=40, messages=ASK, extra_body={"temperature": 1.0},
                                output_config={"format": {"type": "json_schema", "schema": schema}})
        jsonschema.validate(json.loads(msg.content[0].text), schema)
    with pytest.raises(anthropic.BadRequestError, match="output_config.format.schema"):
        c.messages.create(model=MODEL, max_tokens=4, messages=ASK, output_config={
            "format": {"type": "json_schema", "schema": {"type": "array", "uniqueItems": True}}})
