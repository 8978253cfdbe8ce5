"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on loopback.

Two servers per module: one over the tiny model (experts="torch"), one over FakeEngine, which emits the
token ids of a scripted K2 output (tool calls included: the tiny model never chooses tools) and can
block or run forever, so queueing and disconnects are tested without timing assumptions.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import json
import random
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn

import hybrid
from hybrid.text.chat import (ARG_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END, encode_chat,
                         parse_tool_calls, render_chat)
from hybrid.cli.serve import add_serve_parser
from hybrid.serve.app import create_app
from hybrid.serve.api import ApiError, parse_chat, parse_completion
from hybrid.serve.streaming import CallArgs, CallStart, Content, StopMatcher, ToolCallStream
from hybrid.serve.worker import LIVE_JOBS
from hybrid.runtime.sampler import TokenSample
from hybrid.text.tokenizer import Tokenizer

MODEL = "kimi-k2"
CHAT = [{"role": "user", "content": "Tell me a story about a cat."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather-v2", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "time_now", "parameters": {"type": "object"}}}]
TOOL_OUTPUT = (f'Let me check.{SECTION_BEGIN}{CALL_BEGIN}functions.get_weather-v2:0{ARG_BEGIN}'
               f'{{"city": "Paris", "unit": "celsius"}}{CALL_END}{CALL_BEGIN}functions.time_now:1{ARG_BEGIN}{{}}'
               f'{CALL_END}{SECTION_END}')


# ---- harness ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def serving(app):
    """Run app on uvicorn in a thread, on a free loopback port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down: a request is still hanging"


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_for(url: str, running: int, waiting: int, timeout: float = 20.0) -> None:
    """Poll /health until the queue reads (running, waiting); fail after timeout (never asserts on speed)."""
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(url + "/health").json()
        if (h["running"], h["waiting"]) == (running, waiting):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"queue stayed at {h}, expected running={running} waiting={waiting}")
        time.sleep(0.01)


class _FakeHandle:
    def __init__(self, request, tokens):
        self.request, self.tokens, self.out = request, tokens, []
        self.status, self.cancelled, self.reason, self.error = "waiting", False, None, None


class FakeEngine:
    """Stands in for hybrid.Engine's serving interface (what hybrid/serve/worker.py calls): one request runs per
    step (max_batch 1); each step emits its next token of `script` (then <|im_end|>) through on_sample.

    gate: if set, a request's first token waits for it (the worker's step blocks). endless: emit one token
    forever, until on_sample returns False (or max_new_tokens). fail_after: the step raises after that many
    tokens (a failed forward). `ended_by` says why the last request ended; `prompts` lists the prompts in the
    order the engine started computing them.
    """
    max_batch = 1
    max_context = 4096

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.cfg = SimpleNamespace(max_position_embeddings=4096, vocab_size=tokenizer.vocab_size)
        self.device = torch.device("cpu")
        self.prompts: list[list[int]] = []
        self.samplings: list = []          # the SamplingParams of each request, in submission order
        self._queue: list[_FakeHandle] = []
        self.reset()

    def reset(self):
        self.script, self.gate, self.endless, self.ended_by, self.emitted = "Hello there.", None, False, None, 0
        self.fail_after: int | None = None      # raise RuntimeError after this many tokens

    def default_stop_ids(self):
        return self.tokenizer.stop_ids

    def stats(self):
        from hybrid.runtime.blocks import PrefixStats
        from hybrid.runtime.experts import ExpertStats, Served
        from hybrid.runtime.stats import EngineStats, ExpertActivations, KVBlocks, SchedulerState
        served = Served(hot_set=3, cpu=1)
        return EngineStats(
            prefill_tokens=0, prefill_seconds=0.0, decode_tokens=0, decode_seconds=0.0, generated_tokens=0, steps=0,
            prefill_tokens_per_s=10.0, decode_tokens_per_s=5.0, expert_activations=ExpertActivations.of(served),
            experts="fp8", dense="auto", device="cpu", cpu_kernels="avx2", expert_backend=ExpertStats("hybrid", served),
            scheduler=SchedulerState(0, 0, 0, 0, 0, 0),
            kv_blocks=KVBlocks(8, sum(h.status == "running" for h in self._queue), 0, 32),
            prefix_cache=PrefixStats(), devices=())

    def submit(self, request):
        self.samplings.append(request.sampling)
        tok = self.tokenizer
        toks = (itertools.repeat(tok.encode("a")[0]) if self.endless
                else iter(tok.encode(self.script, allow_special=True) + [tok.im_end_id]))
        h = _FakeHandle(request, toks)
        self._queue.append(h)
        return h

    def cancel(self, h):
        h.cancelled = True

    def output(self, h):
        return list(h.out)

    def outcome(self, h):
        return h.reason, h.error

    def cached_tokens(self, h):
        return 0

    def step(self):
        for h in [h for h in self._queue if h.cancelled]:
            self._end(h, "cancelled")
        if not self._queue:
            return []
        h = self._queue[0]
        if h.status == "waiting":
            h.status = "running"
            self.prompts.append(list(h.request.ids))
            if self.gate is not None:
                assert self.gate.wait(30), "test gate never opened"
        t = next(h.tokens)
        h.out.append(t)
        self.emitted = len(h.out)
        if len(h.out) == self.fail_after:
            raise RuntimeError("boom: the expert kernel crashed")
        if h.request.on_sample(TokenSample(t)) is False:
            return self._end(h, "on_sample")
        if t in h.request.stop_ids or len(h.out) >= h.request.max_new_tokens:
            return self._end(h, "stop" if t in h.request.stop_ids else "length")
        if self.endless:
            time.sleep(0.001)
        return []

    def _end(self, h, why):
        self.ended_by, h.reason, h.status = why, why, "finished"
        self._queue.remove(h)
        return [h]


# Shared by the other server test modules, which import them (each module gets its own instances).
@pytest.fixture(scope="module")
def tiny(tiny_models):
    return hybrid.load(tiny_models("k2", "fp8"), device="cpu", experts="torch")


@pytest.fixture(scope="module")
def real(tiny):
    with serving(create_app(tiny, MODEL, max_queue=32)) as url:
        yield url


@pytest.fixture(scope="module")
def fake_server(tiny):
    engine = FakeEngine(tiny.tokenizer)
    with serving(create_app(engine, MODEL, max_queue=1, max_body_bytes=1 << 16)) as url:
        yield url, engine


@pytest.fixture
def fake(fake_server):
    url, engine = fake_server
    engine.reset()
    yield url, engine
    if engine.gate is not None:
        engine.gate.set()
    wait_for(url, 0, 0)


def reference(engine, messages, max_tokens, **kw):
    """(text, finish_reason, n_tokens) straight from engine.generate, for comparison with the server."""
    out = engine.generate(encode_chat(engine.tokenizer, messages), max_tokens, **kw)
    finish = "stop" if out[-1] in engine.default_stop_ids() else "length"
    return engine.tokenizer.decode(out, skip_special=True), finish, len(out)


# ---- text processing (no server) -------------------------------------------------------------------
def feed_stop(stops, text, cuts):
    m, out, prev = StopMatcher(stops), [], 0
    for c in [*cuts, len(text)]:
        out.append(m.push(text[prev:c]))
        prev = c
    return "".join(out) + m.finish(), m.stopped


@pytest.mark.parametrize("stops,text,want", [
    (["END"], "abcENDdef", ("abc", True)),
    (["xyz", "cE"], "abcENDdef", ("ab", True)),        # the earliest stop wins
    (["ENDX"], "abcENDdef", ("abcENDdef", False)),     # a partial match is released at the end
    (["aa"], "baaa", ("b", True)),
    ([], "plain", ("plain", False)),
])
def test_stop_matcher_at_every_split(stops, text, want):
    for k in range(len(text) + 1):
        assert feed_stop(stops, text, [k]) == want, k
    assert feed_stop(stops, text, list(range(len(text)))) == want


def feed_tools(text, cuts):
    s, events, prev = ToolCallStream(), [], 0
    for c in [*cuts, len(text)]:
        events += s.push(text[prev:c])
        prev = c
    events += s.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls = {}
    for e in events:
        if isinstance(e, CallStart):
            calls[e.index] = {"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}}
        elif isinstance(e, CallArgs):
            calls[e.index]["function"]["arguments"] += e.text
    return content, [calls[i] for i in s.completed], events


@pytest.mark.parametrize("text", [
    TOOL_OUTPUT,
    "no calls at all, just < and <| and <|tool",
    f"{SECTION_BEGIN}  {CALL_BEGIN} functions.a.b-c:3 {ARG_BEGIN} \n{{\"x\": [1, 2]}}\t {CALL_END}tail",
    f"x{SECTION_BEGIN}{CALL_BEGIN}functions.f:0{ARG_BEGIN}{{\"cut\": ",                # cut off: dropped
    f"x{SECTION_BEGIN}{CALL_BEGIN}{ARG_BEGIN}{{}}{CALL_END}{CALL_BEGIN}g:1{ARG_BEGIN}[]{CALL_END}",  # no id
    f"x{SECTION_BEGIN}{CALL_BEGIN}functions.f:0{ARG_BEGIN}{{{CALL_BEGIN}functions.h:1{ARG_BEGIN}{{}}{CALL_END}",
    f"x{SECTION_BEGIN}{CALL_BEGIN}functions.f<|:0{ARG_BEGIN}{{}}{CALL_END}{CALL_BEGIN}h:1{ARG_BEGIN}1{CALL_END}",
    f"x{SECTION_BEGIN}{SECTION_END}{CALL_BEGIN}functions.f:0{ARG_BEGIN}{{}}{CALL_END}",
])
def test_tool_call_stream_adds_up_to_parse_tool_calls(text):
    want = parse_tool_calls(text)
    for k in range(len(text) + 1):
        assert feed_tools(text, [k])[:2] == want, k
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(1, min(12, len(text)))))
        assert feed_tools(text, cuts)[:2] == want, cuts


def test_tool_call_stream_sends_name_before_arguments_end():
    head = TOOL_OUTPUT[:TOOL_OUTPUT.index('"unit"')]
    s = ToolCallStream()
    events = s.push(head)
    assert CallStart(0, "functions.get_weather-v2:0", "get_weather-v2") in events
    assert events[-1] == CallArgs(0, '{"city": "Paris",')      # the trailing space waits for what follows
    assert s.completed == []


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"model": MODEL, "messages": CHAT, "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": CHAT, "temperature": 3}, "temperature"),
    ({"model": MODEL, "messages": CHAT, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 1.5}, "max_tokens"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": True}, "max_tokens"),
    ({"model": MODEL, "messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": MODEL, "messages": CHAT, "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": MODEL, "messages": CHAT, "stop": 5}, "stop"),
    ({"model": MODEL, "messages": CHAT, "seed": "1"}, "seed"),
    ({"model": MODEL, "messages": CHAT, "n": 0}, "n"),
    ({"model": MODEL, "messages": CHAT, "n": 99}, "n"),
    ({"model": MODEL, "messages": CHAT, "tools": {"a": 1}}, "tools"),
    ({"model": MODEL, "messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ({"model": MODEL, "messages": CHAT, "tools": TOOLS, "tool_choice": {"type": "function",
                                                                        "function": {"name": "nope"}}}, "tool_choice"),
    ({"model": "gpt-4", "messages": CHAT}, "model"),
    ({"messages": CHAT}, "model"),
])
def test_parse_chat_rejects_bad_fields(body, param):
    with pytest.raises(ApiError) as e:
        parse_chat(body, MODEL)
    assert (e.value.status, e.value.param) == (400, param)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_parse_defaults_and_forms():
    req = parse_chat({"model": MODEL, "messages": [{"role": "developer", "content": "be brief"}, *CHAT],
                      "stop": "x", "tools": TOOLS, "tool_choice": "none"}, MODEL)
    g = req.generation
    assert g.params.temperature == 0.6 and g.max_tokens is None and g.stop == ("x",)
    assert req.messages[0]["role"] == "system" and req.tools is None
    assert parse_completion({"model": MODEL, "prompt": [[1, 2]]}, MODEL).prompt == [1, 2]
    with pytest.raises(ApiError, match="one prompt per request"):
        parse_completion({"model": MODEL, "prompt": [[1], [2]]}, MODEL)


# ---- the real tiny model over HTTP -----------------------------------------------------------------
def test_models_health_metrics(real):
    models = client(real).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(real).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client(real).models.retrieve("gpt-4o")
    assert httpx.get(real + "/health").json()["status"] == "ok"
    client(real).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    text = httpx.get(real + "/metrics").text
    assert 'hybrid_http_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "hybrid_expert_hot_set_hit_rate 0.0" in text        # torch experts: nothing in the hot set
    assert float(text.split('hybrid_expert_activations_total{tier="device"} ')[1].split()[0]) > 0


def test_chat_matches_engine_and_counts_usage(real, tiny):
    r = client(real).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    text, finish, n = reference(tiny, CHAT, 12)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.tool_calls is None
    prompt = len(encode_chat(tiny.tokenizer, CHAT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, n, prompt + n)


def test_streaming_chat_equals_non_streaming(real):
    c = client(real)
    kw = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=0.9, seed=11)
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_seed_gives_identical_output(real):
    c = client(real)
    kw = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0)
    a, b, other = (c.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (7, 7, 8))
    assert a == b and a != other


def test_stop_sequence_cuts_text_and_generation(real):
    c = client(real)
    kw = dict(model=MODEL, messages=CHAT, max_tokens=24, temperature=0.8, seed=3)
    full = c.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert len(text) >= 12, f"precondition: a long enough sample, got {text!r}"
    stop = text[len(text) // 2:len(text) // 2 + 3]
    want = text[:text.index(stop)]
    cut = c.chat.completions.create(**kw, stop=["never-there", stop])
    assert cut.choices[0].message.content == want and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    stream = c.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want


def test_completions_text_ids_and_stream(real, tiny):
    c = client(real)
    ids = tiny.tokenizer.encode("Once upon a time")
    a = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    b = c.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    s = "".join(ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt=ids, max_tokens=8,
                                                                  temperature=0, stream=True))
    assert a.choices[0].text == b.choices[0].text == s
    assert a.usage.prompt_tokens == len(ids) and a.usage.completion_tokens == b.usage.completion_tokens


def post(url, path, body=None, content=None, timeout=60.0):
    return httpx.post(url + path, json=body, content=content, timeout=timeout)


def test_malformed_requests_get_openai_errors(real):
    r = post(real, "/v1/chat/completions", content=b'{"model": "kimi-k2", "messages": [')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post(real, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post(real, "/v1/completions", {"model": MODEL, "prompt": [1, 99999]})
    assert r.status_code == 400 and "99999" in r.json()["error"]["message"]
    r = httpx.get(real + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:
        client(real).chat.completions.create(model="gpt-4o", messages=CHAT)
    assert e.value.status_code == 400 and e.value.body["code"] == "model_not_found"


def test_context_overflow_is_400_with_numbers(real, tiny):
    prompt = len(encode_chat(tiny.tokenizer, CHAT))
    r = post(real, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 10**9})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert f"{prompt + 10**9} tokens ({prompt} in the messages, {10**9} in the completion)" in err["message"]
    assert "8192" in err["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192"):
        client(real).completions.create(model=MODEL, prompt=[5] * 9000, max_tokens=1)
    long_chat = [{"role": "user", "content": "hello world " * 3000}]
    n = len(encode_chat(tiny.tokenizer, long_chat))
    assert n > 8192
    with pytest.raises(openai.BadRequestError, match=f"requested {n + 1} tokens \\({n} in the messages"):
        client(real).chat.completions.create(model=MODEL, messages=long_chat, max_tokens=1)
    assert httpx.get(real + "/health").json()["status"] == "ok"


def metric(url: str, sample: str) -> float:
    lines = [ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(sample + " ")]
    assert len(lines) == 1, f"{sample} not in /metrics"
    return float(lines[0].split()[-1])


def test_sixteen_streams_four_disconnect(real):
    c = client(real)
    outcomes = ("finished", "cancelled", "failed")
    before = {k: metric(real, f'hybrid_generations_total{{outcome="{k}"}}') for k in outcomes}
    results, errors = {}, []

    def run(i):
        try:
            kw = dict(model=MODEL, messages=[{"role": "user", "content": f"story {i}"}], temperature=1.0, seed=i)
            if i % 4 == 0:        # leaves after the first chunk, with a long generation still ahead
                with c.chat.completions.create(**kw, max_tokens=4000, stream=True) as stream:
                    next(iter(stream))
                results[i] = "left"
                return
            chunks = list(c.chat.completions.create(**kw, max_tokens=8, stream=True,
                                                    stream_options={"include_usage": True}))
            results[i] = (chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens)
        except Exception as e:    # reported below with the client's index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sum(v == "left" for v in results.values()) == 4
    done = [v for v in results.values() if v != "left"]
    assert len(done) == 12 and all(f in ("stop", "length") and 1 <= n <= 8 for f, n in done)
    wait_for(real, 0, 0)
    gc.collect()
    assert len(LIVE_JOBS) == 0        # every request's job, queue entry and buffers are gone
    assert httpx.get(real + "/health").json()["status"] == "ok"
    after = {k: metric(real, f'hybrid_generations_total{{outcome="{k}"}}') for k in before}
    assert after["finished"] + after["cancelled"] - before["finished"] - before["cancelled"] == 16
    assert after["failed"] == before["failed"]


# ---- scripted output (FakeEngine): tool calls, queueing, disconnects -------------------------------
def test_tool_call_round_trip(fake, tiny):
    url, engine = fake
    engine.script = TOOL_OUTPUT
    c = client(url)
    r = c.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check."
    assert [(t.id, t.function.name) for t in msg.tool_calls] == [
        ("functions.get_weather-v2:0", "get_weather-v2"), ("functions.time_now:1", "time_now")]
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert render_chat(CHAT, TOOLS) == tiny.tokenizer.decode(engine.prompts[-1])

    engine.script = "It is 21 degrees."
    follow = [*CHAT, msg.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temp": 21}'},
              {"role": "tool", "tool_call_id": msg.tool_calls[1].id, "content": "12:00"}]
    r2 = c.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS)
    assert r2.choices[0].message.content == "It is 21 degrees." and r2.choices[0].finish_reason == "stop"
    prompt = tiny.tokenizer.decode(engine.prompts[-1])
    assert prompt == render_chat(follow, TOOLS)
    assert f"{CALL_BEGIN}functions.get_weather-v2:0{ARG_BEGIN}" in prompt
    assert "## Return of functions.get_weather-v2:0\n{\"temp\": 21}" in prompt


def test_tool_calls_stream_incrementally(fake):
    url, engine = fake
    engine.script = TOOL_OUTPUT
    chunks = list(client(url).chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    headers = [tc for tc in calls if tc.id]
    assert [(h.index, h.id, h.function.name) for h in headers] == [
        (0, "functions.get_weather-v2:0", "get_weather-v2"), (1, "functions.time_now:1", "time_now")]
    args0 = [tc.function.arguments for tc in calls if tc.index == 0 and not tc.id]
    assert len(args0) > 1 and json.loads("".join(args0)) == {"city": "Paris", "unit": "celsius"}
    assert calls.index(headers[0]) < calls.index(headers[1])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_hides_tools(fake, tiny):
    url, engine = fake
    engine.script = TOOL_OUTPUT
    r = client(url).chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert "tool_declare" not in tiny.tokenizer.decode(engine.prompts[-1])


def test_queue_full_is_503_and_fifo(fake):
    url, engine = fake
    engine.gate = threading.Event()
    c, answers = client(url), []
    first = threading.Thread(target=lambda: answers.append(
        c.completions.create(model=MODEL, prompt="first", max_tokens=50).choices[0].text))
    first.start()
    wait_for(url, 1, 0)
    second = threading.Thread(target=lambda: answers.append(
        c.completions.create(model=MODEL, prompt="second", max_tokens=50).choices[0].text))
    second.start()
    wait_for(url, 1, 1)
    with pytest.raises(openai.InternalServerError) as e:
        c.completions.create(model=MODEL, prompt="third", max_tokens=4)
    assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
    engine.gate.set()
    first.join(30)
    second.join(30)
    assert answers == ["Hello there.", "Hello there."]
    dec = engine.tokenizer.decode
    assert [dec(p) for p in engine.prompts[-2:]] == ["first", "second"]     # served in arrival order


def test_disconnect_stops_generation_and_frees_slot(fake):
    url, engine = fake
    engine.endless = True
    c = client(url)
    with c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4000, stream=True) as stream:
        it = iter(stream)
        for _ in range(3):
            next(it)
    wait_for(url, 0, 0)
    assert engine.ended_by in ("on_sample", "cancelled") and engine.emitted < 4000
    engine.ended_by = None
    with pytest.raises(httpx.ReadTimeout):          # a non-streaming client that gives up
        post(url, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 4000}, timeout=0.5)
    wait_for(url, 0, 0)
    assert engine.ended_by in ("on_sample", "cancelled") and engine.emitted < 4000
    engine.endless = False
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=50)
    assert r.choices[0].message.content == "Hello there."


def test_disconnect_while_queued_leaves_the_queue(fake):
    url, engine = fake
    engine.gate = threading.Event()
    c = client(url)
    running = threading.Thread(target=lambda: c.completions.create(model=MODEL, prompt="busy", max_tokens=2))
    running.start()
    wait_for(url, 1, 0)
    n_prompts = len(engine.prompts)
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "queued", "stream": True}):
            wait_for(url, 1, 1)
    wait_for(url, 1, 0)                 # gone from the queue while the first request still runs
    engine.gate.set()
    running.join(30)
    wait_for(url, 0, 0)
    assert len(engine.prompts) == n_prompts     # the engine never computed the abandoned request


def test_engine_failure_is_reported_and_server_keeps_serving(fake):
    url, engine = fake
    engine.fail_after = 2
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": CHAT})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "boom: the expert kernel crashed" in r.json()["error"]["message"]
    c = client(url)
    with pytest.raises(openai.APIError, match="boom"):
        for _ in c.chat.completions.create(model=MODEL, messages=CHAT, stream=True):
            pass
    engine.fail_after = None
    assert c.chat.completions.create(model=MODEL, messages=CHAT).choices[0].message.content == "Hello there."


def test_oversized_body_is_413(fake):
    url, _ = fake
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_metrics_report_hot_set_hit_rate(fake):
    url, _ = fake
    client(url).chat.completions.create(model=MODEL, messages=CHAT)
    assert metric(url, "hybrid_expert_hot_set_hit_rate") == 0.75


def test_serve_parser_defaults():
    import argparse
    sub = argparse.ArgumentParser(prog="hybrid").add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    a = sub.choices["serve"].parse_args([])
    assert (a.host, a.port, a.served_model_name, a.max_queue, a.model) == ("127.0.0.1", 8000, "kimi-k2", 64, None)
    assert callable(a.func)
    a = sub.choices["serve"].parse_args(["--experts", "torch", "--port", "9001", "--max-queue", "3"])
    assert (a.experts, a.port, a.max_queue) == ("torch", 9001, 3)
