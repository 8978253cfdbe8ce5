"""API keys (issue 16): with --api-key, every endpoint but /health wants `Authorization: Bearer KEY` or
`x-api-key: KEY`; a missing or wrong key is a 401 in the error shape of the API called (and is counted)."""
from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from hybrid.serve.app import create_app
from test_server import CHAT, MODEL, FakeEngine, serving

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def url(tiny_models):
    from hybrid.text.tokenizer import Tokenizer
    engine = FakeEngine(Tokenizer.from_dir(tiny_models("k2", "fp8")))
    with serving(create_app(engine, MODEL, api_key=KEY)) as u:
        yield u


def test_openai_client_key_accepted_refused_required(url):
    ok = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert ok.chat.completions.create(model=MODEL, messages=CHAT).choices[0].message.content == "Hello there."
    assert [m.id for m in ok.models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=CHAT)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert "not valid" in e.value.body["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and "no API key" in r.json()["error"]["message"]


def test_anthropic_client_key_accepted_refused(url):
    ok = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0)
    msg = ok.messages.create(model=MODEL, max_tokens=16, messages=CHAT)
    assert msg.content[0].text == "Hello there."
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=url, api_key="sk-wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=16, messages=CHAT)
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error", "message": e.value.body[
        "error"]["message"]}} and "not valid" in e.value.body["error"]["message"]


def test_either_header_works_on_either_api(url):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4}
    assert httpx.post(url + "/v1/chat/completions", json=body, headers={"x-api-key": KEY}).status_code == 200
    assert httpx.post(url + "/v1/messages", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_health_is_open_and_refusals_are_counted(url):
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 401
    text = httpx.get(url + "/metrics", headers={"x-api-key": KEY}).text
    assert 'hybrid_http_requests_total{endpoint="/metrics",status="401"}' in text
    assert 'hybrid_http_requests_total{endpoint="/v1/chat/completions",status="401"}' in text


def test_empty_key_is_refused():
    from hybrid.serve.auth import ApiKey
    with pytest.raises(ValueError, match="empty"):
        ApiKey(None, "")
