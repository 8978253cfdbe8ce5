"""What a hostile but fair user found (issue 19), one test each, plus the classes that already behaved.

Nesting bombs on every POST endpoint get a 400 on a connection that stays usable; 5xx are counted in
/metrics; content the model cannot read is refused by name; non-finite sampling values get a 400 naming the
field on both APIs; Ctrl-C with streams in flight ends every stream with an error event and no traceback;
a busy port and bad flags fail before the model loads.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from hybrid.serve.body import MAX_NESTING, nesting_depth
from test_server import CHAT, MODEL, FakeEngine, metric, serving
from hybrid.serve.app import create_app

POSTS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/messages": "messages",
         "/v1/messages/count_tokens": "messages"}


@pytest.fixture(scope="module")
def tok(tiny_models):
    from hybrid.text.tokenizer import Tokenizer
    return Tokenizer.from_dir(tiny_models("k2", "fp8"))


@pytest.fixture(scope="module")
def fake_server(tok):
    engine = FakeEngine(tok)
    with serving(create_app(engine, MODEL, max_queue=4, max_body_bytes=1 << 21)) as url:
        yield url, engine


def _connection(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


# ---- item 2: nesting -------------------------------------------------------------------------------
def test_nesting_depth_ignores_brackets_in_strings():
    assert nesting_depth(b'[[1], {"a": [[]]}]') == 4
    assert nesting_depth(b'["[[[[", "\\"[[", {"k": "]]]"}]') == 2
    assert nesting_depth(b'"no containers"') == 0


@pytest.mark.parametrize("depth", [1_000, 10_000, 100_000])
def test_nesting_bomb_is_400_and_the_connection_stays_usable(fake_server, depth):
    url, _ = fake_server
    conn = _connection(url)
    for path, field in POSTS.items():
        bomb = b"[" * depth + b"]" * depth
        body = b'{"model": "kimi-k2", "max_tokens": 4, "%s": %s}' % (field.encode(), bomb)
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        err = json.loads(r.read())
        assert r.status == 400, (path, depth, err)
        message = err["error"]["message"]
        assert f"{depth + 1} levels deep" in message and f"limit is {MAX_NESTING}" in message, message
        if path.startswith("/v1/messages"):
            assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
        sock = conn.sock
        conn.request("GET", "/health")                 # the same connection still serves
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        assert conn.sock is sock and sock is not None, f"{path}: the server closed the connection"
    conn.close()


def test_legitimately_nested_body_still_parses(fake_server):
    url, _ = fake_server
    schema = {"type": "object"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"x": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "tools": tools,
                                                         "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text


def test_unhandled_error_is_counted_as_500(fake_server, monkeypatch):
    url, engine = fake_server
    sample = 'hybrid_http_requests_total{endpoint="/v1/chat/completions",status="500"}'
    before = _maybe_metric(url, sample)

    def broken():
        raise RuntimeError("stop ids unavailable")
    monkeypatch.setattr(engine, "default_stop_ids", broken)
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT}, timeout=60)
    assert r.status_code == 500 and "stop ids unavailable" in r.json()["error"]["message"]
    assert _maybe_metric(url, sample) == before + 1


def _maybe_metric(url: str, sample: str) -> float:
    lines = [ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(sample + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


# ---- items 3 and 4: content the model cannot use ---------------------------------------------------
@pytest.mark.parametrize("path,messages,param,words", [
    ("/v1/chat/completions", [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}],
     "messages[0].content[1].type", "'image_url'"),
    ("/v1/chat/completions", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
     "messages[0].content[0].type", "'input_audio'"),
    ("/v1/chat/completions", [{"role": "system", "content": "be brief"}, {"role": "user", "content": None}],
     "messages[1].content", "messages[1].content is null"),
    ("/v1/chat/completions", [{"role": "user", "content": [{"type": "text", "text": 5}]}],
     "messages[0].content[0].text", "a string"),
    ("/v1/messages", [{"role": "user", "content": [
        {"type": "text", "text": "Describe it."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}],
     "messages.0.content.1.type", "'image'"),
    ("/v1/messages", [{"role": "user", "content": None}], "messages.0.content", "content"),
])
def test_content_the_model_cannot_read_is_refused_by_name(fake_server, path, messages, param, words):
    url, engine = fake_server
    n = len(engine.prompts)
    r = httpx.post(url + path, json={"model": MODEL, "messages": messages, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and param in (err.get("param") or err["message"]), err
    assert len(engine.prompts) == n                    # nothing was generated


def test_assistant_content_null_with_tool_calls_is_fine(fake_server):
    url, _ = fake_server
    msgs = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "functions.f:0", "content": "ok"}]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 4})
    assert r.status_code == 200, r.text


# ---- item 5: non-finite sampling values (the CLI and Python API: test_sampling.py) --------------------
@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "temperature", "NaN"), ("/v1/chat/completions", "temperature", "Infinity"),
    ("/v1/chat/completions", "top_p", "NaN"), ("/v1/chat/completions", "frequency_penalty", "-Infinity"),
    ("/v1/chat/completions", "presence_penalty", "NaN"), ("/v1/completions", "temperature", "Infinity"),
    ("/v1/messages", "temperature", "NaN"), ("/v1/messages", "top_p", "Infinity"),
])
def test_server_refuses_non_finite_sampling_values(fake_server, path, field, value):
    url, _ = fake_server
    key = "prompt" if path == "/v1/completions" else "messages"
    body = '{"model": "kimi-k2", "max_tokens": 4, "%s": %s, "%s": %s}' % (
        key, json.dumps("hi" if key == "prompt" else CHAT), field, value)
    r = httpx.post(url + path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "finite" in err["message"] and field in err["message"]
    if path != "/v1/messages":
        assert err["param"] == field


def test_sampling_fields_reach_the_engine_as_sampling_params(fake_server):
    url, engine = fake_server
    httpx.post(url + "/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "temperature": 0.3, "top_p": 0.9, "seed": 5, "frequency_penalty": 0.5,
        "presence_penalty": -0.25, "logprobs": True, "top_logprobs": 3, "max_tokens": 4}).raise_for_status()
    p = engine.samplings[-1]
    assert (p.temperature, p.top_p, p.seed, p.frequency_penalty, p.presence_penalty, p.logprobs) == (
        0.3, 0.9, 5, 0.5, -0.25, 3)
    assert not math.isnan(p.temperature)


# ---- item 6: Ctrl-C with streams in flight -----------------------------------------------------------
def _start_server(model_dir, *flags) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "hybrid", "serve", "--model", str(model_dir), "--port", "0",
                             "--experts", "torch", "--log-level", "warning", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("hybrid: serving"):
            return proc, line.split(" on ")[1].split()[0]
    raise AssertionError(f"the server did not start: {proc.stderr.read()}")


# A random-weight model may stop at any token; this schema keeps every stream going for thousands of tokens.
LONG = {"type": "json_schema", "json_schema": {"name": "long", "schema": {
    "type": "object", "required": ["s"], "properties": {"s": {"type": "string", "minLength": 5000}}}}}


@pytest.mark.slow   # intermittent since 2026-12-08 in the full suite (2 of 3 streams never get a first line, the
#                    server idle); passes alone: the cause is not found yet (see the issue 28 note), so it runs
#                    with `make test-all` until it is fixed
def test_ctrl_c_ends_every_stream_with_an_error_event_and_no_traceback(tiny_models):
    proc, url = _start_server(tiny_models("k2", "fp8"), "--shutdown-grace-s", "4")
    streams: dict[int, list[str]] = {}
    first = threading.Barrier(4)

    def stream(i: int) -> None:
        lines = streams.setdefault(i, [])
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 6000,
                "temperature": 1.0, "stream": True, "response_format": LONG}
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                it = r.iter_lines()
                lines.append(next(it))
                first.wait(240)
                lines.extend(it)
        except httpx.HTTPError as e:           # an incomplete chunked body: what issue 19 saw
            lines.append(f"<transport error: {e!r}>")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    first.wait(240)                            # one stream generating, two queued, all with a first chunk
    proc.send_signal(signal.SIGINT)
    for t in threads:
        t.join(120)
    _, stderr = proc.communicate(timeout=120)
    for i, lines in streams.items():
        data = [ln for ln in lines if ln.startswith("data: ")]
        assert data[-1] == "data: [DONE]", (i, lines[-3:])
        err = json.loads(data[-2][6:])["error"]
        assert err["code"] == "server_shutdown" and err["type"] == "server_error", err
    assert "Traceback" not in stderr and "Exception in ASGI" not in stderr, stderr
    assert "timeout graceful shutdown exceeded" not in stderr, stderr   # uvicorn's line when the grace runs out
    assert proc.returncode in (0, 130) and "hybrid: interrupted" in stderr


# ---- item 7: checks that need no model come first ----------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model would take minutes: fail the test if a command gets that far."""
    import hybrid.cli.serve as cli_serve
    loads = []

    def slow_load(a):
        loads.append(a)
        raise AssertionError("the model was loaded before the argument checks")
    monkeypatch.setattr(cli_serve, "load_engine", slow_load)
    return loads


def test_busy_port_fails_before_loading(no_loading, capsys):
    from hybrid.cli import main
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err
    assert no_loading == []


@pytest.mark.parametrize("flags,words", [
    (["--max-queue", "-1"], "--max-queue"), (["--max-body-mb", "0"], "--max-body-mb"),
    (["--shutdown-grace-s", "-1"], "--shutdown-grace-s"), (["--port", "70000"], "--port"),
    (["--api-key", " "], "--api-key"), (["--host", "no-such-host.invalid"], "--host"),
    (["--threads", "0"], "threads"),
])
def test_bad_flags_fail_before_loading(no_loading, capsys, flags, words):
    from hybrid.cli import main
    assert main(["serve", "--port", "0", *flags]) == 2
    assert words in capsys.readouterr().err
    assert no_loading == []


def test_public_bind_without_a_key_warns_first(no_loading, capsys, monkeypatch):
    from hybrid.cli import main
    monkeypatch.delenv("HYBRID_API_KEY", raising=False)
    with pytest.raises(AssertionError, match="loaded before"):
        main(["serve", "--host", "0.0.0.0", "--port", "0"])
    assert "without an API key" in capsys.readouterr().err
    monkeypatch.setenv("HYBRID_API_KEY", "sk-test")
    with pytest.raises(AssertionError, match="loaded before"):
        main(["serve", "--host", "0.0.0.0", "--port", "0"])
    assert "without an API key" not in capsys.readouterr().err


# ---- classes that behaved (kept so they stay that way) -------------------------------------------------
def test_disconnects_under_load_leave_no_jobs(fake_server):
    from test_server import wait_for
    from hybrid.serve.worker import LIVE_JOBS
    import gc
    url, engine = fake_server
    engine.endless = True
    try:
        for _ in range(6):
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
                    "model": MODEL, "messages": CHAT, "max_tokens": 4000, "stream": True}) as r:
                next(r.iter_lines())
    finally:
        engine.endless = False
    wait_for(url, 0, 0)
    gc.collect()
    assert len(LIVE_JOBS) == 0
    assert metric(url, 'hybrid_generations_total{outcome="failed"}') == 0


# ---- round 2, item 4: tool names the K2 call format cannot carry --------------------------------------
@pytest.mark.parametrize("name", ["\\ud800", "<|im_end|>", 'a\\"b<|tool_call_end|>', "a" * 65, "get weather", ""])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_tool_names_outside_the_pattern_are_refused_by_field(fake_server, path, name):
    url, engine = fake_server
    n = len(engine.prompts)
    if path == "/v1/messages":
        tools, param = '[{"name": "%s", "input_schema": {"type": "object"}}]' % name, "tools.0.name"
    else:
        tools = '[{"type": "function", "function": {"name": "%s", "parameters": {"type": "object"}}}]' % name
        param = "tools[0].function.name"
    body = '{"model": "kimi-k2", "max_tokens": 4, "messages": %s, "tools": %s, "tool_choice": %s}' % (
        json.dumps(CHAT), tools, '{"type": "any"}' if path == "/v1/messages" else '"required"')
    r = httpx.post(url + path, content=body.encode(), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in err["message"] and ("must match" in err["message"] or not name)
    assert len(engine.prompts) == n


# ---- round 2, item 2: a prompt that cannot fit is refused before it is tokenized ----------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages"])
def test_a_prompt_too_long_for_any_tokenization_is_refused_untokenized(fake_server, path, monkeypatch):
    url, engine = fake_server
    calls = []
    real = type(engine.tokenizer).encode
    monkeypatch.setattr(type(engine.tokenizer), "encode", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    text = "ab " * (engine.max_context * engine.tokenizer.max_token_bytes)      # >= 3x the bound
    body = {"model": MODEL, "max_tokens": 4, **({"prompt": text} if path == "/v1/completions" else
                                                 {"messages": [{"role": "user", "content": text}]})}
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "at least" in err["message"] and "context length" in err["message"]
    assert calls == []                                   # nothing was tokenized


def test_a_second_ctrl_c_stops_at_once_with_one_line(monkeypatch, capsys):
    """Issue 28 item 15: Ctrl-C twice on `hybrid serve` printed two uvicorn tracebacks (its forced exit cancels
    the running requests' tasks); the second signal now ends the process with one line and code 130."""
    import types
    from hybrid.cli import serve as cli_serve
    drained = []
    app = types.SimpleNamespace(state=types.SimpleNamespace(drain=types.SimpleNamespace(begin=drained.append)))
    server = cli_serve._server(app, "warning", 3.0)
    monkeypatch.setattr(cli_serve.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and drained == [3.0]
    with pytest.raises(SystemExit) as e:
        server.handle_exit(signal.SIGINT, None)
    assert e.value.code == 130 and "interrupted twice" in capsys.readouterr().err and drained == [3.0]
