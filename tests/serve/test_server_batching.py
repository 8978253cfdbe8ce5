"""The server over the real tiny engine with continuous batching: concurrent requests answer as they would
alone, a resent conversation reuses its cached prefix (usage and /metrics say so), and the KV pool is whole
again when the requests are gone."""
from __future__ import annotations

import threading

import httpx
import pytest

from test_server import MODEL, client, serving, wait_for

import hybrid
from hybrid.serve.app import create_app

SYSTEM = "You are a careful assistant. " * 20       # well over one 32-token KV block


@pytest.fixture(scope="module")
def batched(tiny_models):
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu", max_batch=4)
    with serving(create_app(eng, MODEL, max_queue=16)) as url:
        yield url, eng


def _metric(url: str, name: str) -> float:
    line = next(ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


def test_concurrent_requests_answer_as_alone(batched):
    url, eng = batched
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(6)]
    ask = lambda p: client(url).chat.completions.create(   # noqa: E731
        model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0)
    alone = [ask(p).choices[0].message.content for p in prompts]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(prompts[i]).choices[0].message.content))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [together[i] for i in range(len(prompts))] == alone
    wait_for(url, 0, 0)
    assert _metric(url, "hybrid_kv_blocks_in_use") == 0


def test_a_resent_conversation_reuses_its_prefix(batched):
    url, _ = batched
    c = client(url)
    convo = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    first = c.chat.completions.create(model=MODEL, messages=convo, max_tokens=4, temperature=0)
    hits = _metric(url, "hybrid_prefix_cache_hit_tokens_total")
    convo += [{"role": "assistant", "content": first.choices[0].message.content or "ok"},
              {"role": "user", "content": "And then?"}]
    second = c.chat.completions.create(model=MODEL, messages=convo, max_tokens=4, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and cached % 32 == 0 and cached < second.usage.prompt_tokens
    assert _metric(url, "hybrid_prefix_cache_hit_tokens_total") - hits >= cached
