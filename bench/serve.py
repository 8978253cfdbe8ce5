"""Serving under concurrency: `hybrid serve` (continuous batching, prefix cache) driven by the official
`openai` client over loopback, against one client alone measured in the same run.

    python -m bench.serve --model DIR [--clients 1,2,4,8,16] [--tokens 64] [--agent-turns 6] [--soak-s 60]

1. Concurrency: N clients each stream one chat completion of up to --tokens new tokens (greedy; a random
   model may stop earlier), all started together. Tokens are counted from each stream's final usage chunk
   (stream_options.include_usage), not from content chunks: the server holds back text that is not whole
   UTF-8 yet, so one chunk can carry several tokens. Aggregate decode tokens/s = tokens after each client's
   first / wall time from the first first-token to the last token; inter-token latency = each stream's time
   from its first to its last token / its tokens after the first (median over streams); the median gap
   between content chunks is printed beside it. Ratios to 1 client.
2. Agent loop: a ~2,000-token system+tools prompt, then 6 turns; each turn resends the whole conversation
   (assistant replies included) plus a short user message. Time to first token of each turn, against turn 1.
3. Soak: 32 clients for --soak-s seconds with random prompt lengths, random early disconnects; counts
   failures that were not cancellations, checks that the KV pool is whole again at the end (/metrics), and
   samples the server's RSS after warm-up.
The server runs as a subprocess (`python -m hybrid serve`) on a free loopback port; nothing else is reached.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stream:
    ttft: float = 0.0                       # seconds to the first content token
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0                         # chunks with content received (a chunk may carry several tokens:
                                            # the server holds back text that is not yet whole UTF-8)
    usage_tokens: int = 0                   # completion tokens as the final usage chunk counts them (0: none)
    first: float = 0.0                      # clock of the first token
    last: float = 0.0
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, extra: list[str]) -> subprocess.Popen:
    import httpx
    cmd = [sys.executable, "-m", "hybrid", "serve", "--model", str(model), "--port", str(port),
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up within 10 minutes")


def stream_chat(client, messages, max_tokens: int, stop_after: int | None = None) -> Stream:
    """One streamed chat completion; stop_after: close the stream after that many tokens (a client leaving)."""
    st = Stream()
    t0 = time.perf_counter()
    try:
        stream = client.chat.completions.create(model="kimi-k2", messages=messages, max_tokens=max_tokens,
                                                temperature=0.0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                st.usage_tokens = chunk.usage.completion_tokens
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            now = time.perf_counter()
            if st.tokens == 0:
                st.ttft, st.first = now - t0, now
            else:
                st.gaps.append(now - st.last)
            st.last = now
            st.tokens += 1
            if stop_after is not None and st.tokens >= stop_after:
                stream.close()
                break
    except Exception as e:                  # reported, counted by the caller
        st.error = f"{type(e).__name__}: {e}"
    return st


def words(rng: random.Random, n: int) -> str:
    vocab = ["the", "model", "expert", "router", "token", "cache", "layer", "python", "function", "value",
             "request", "agent", "tool", "result", "memory", "device", "kernel", "stream", "block", "prefix"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def run_clients(url: str, n: int, tokens: int, rng: random.Random) -> list[Stream]:
    import openai
    out: list[Stream | None] = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        msgs = [{"role": "user", "content": words(random.Random(i), 24)}]
        barrier.wait()
        out[i] = stream_chat(c, msgs, tokens)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def concurrency(url: str, counts: list[int], tokens: int) -> list[dict]:
    rows = []
    rng = random.Random(0)
    run_clients(url, 1, 4, rng)                                     # warm-up
    for n in counts:
        streams = run_clients(url, n, tokens, rng)
        errors = [s.error for s in streams if s.error]
        first, last = min(s.first for s in streams if s.tokens), max(s.last for s in streams if s.tokens)
        after_first = sum(max(0, (s.usage_tokens or s.tokens) - 1) for s in streams)
        per_token = [(s.last - s.first) / (s.usage_tokens - 1) for s in streams if s.usage_tokens > 1]
        rows.append({"clients": n, "tok_s": after_first / (last - first) if last > first else 0.0,
                     "itl_ms": 1e3 * statistics.median(per_token) if per_token else 0.0,
                     "chunk_gap_ms": 1e3 * statistics.median(g for s in streams for g in s.gaps),
                     "ttft_ms": 1e3 * statistics.median(s.ttft for s in streams if s.tokens),
                     "tokens": sum(s.tokens for s in streams), "errors": len(errors)})
    base = rows[0]
    for r in rows:
        r["tok_s_x"] = r["tok_s"] / base["tok_s"] if base["tok_s"] else 0.0
        r["itl_x"] = r["itl_ms"] / base["itl_ms"] if base["itl_ms"] else 0.0
    return rows


def agent_loop(url: str, turns: int, system_words: int, tokens: int) -> list[float]:
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    rng = random.Random(7)
    msgs = [{"role": "system", "content": "You are an agent with tools. " + words(rng, system_words)}]
    ttfts = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Turn {t}: " + words(rng, 20)})
        st = stream_chat(c, msgs, tokens)
        if st.error:
            raise RuntimeError(f"agent turn {t} failed: {st.error}")
        ttfts.append(st.ttft)
        msgs.append({"role": "assistant", "content": words(rng, st.tokens)})   # the reply, as an agent resends it
    return ttfts


def soak(url: str, proc: subprocess.Popen, clients: int, seconds: float, tokens: int) -> dict:
    import httpx
    import openai
    import psutil
    stop_at = time.monotonic() + seconds
    counts = {"requests": 0, "failed": 0, "left_early": 0}
    lock = threading.Lock()
    errors: list[str] = []

    def one(i: int) -> None:
        rng = random.Random(100 + i)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        while time.monotonic() < stop_at:
            leave = rng.random() < 0.3
            st = stream_chat(c, [{"role": "user", "content": words(rng, rng.randint(5, 400))}],
                             rng.randint(4, tokens), stop_after=rng.randint(1, 8) if leave else None)
            with lock:
                counts["requests"] += 1
                counts["left_early"] += leave
                if st.error:
                    counts["failed"] += 1
                    errors.append(st.error)
    ps = psutil.Process(proc.pid)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    rss = []
    time.sleep(min(10.0, seconds / 4))                             # warm-up
    while time.monotonic() < stop_at:
        rss.append(ps.memory_info().rss)
        time.sleep(1.0)
    for t in threads:
        t.join()
    deadline = time.monotonic() + 60
    while True:                                                    # the pool drains once cancels are processed
        m = httpx.get(url + "/metrics").text
        used = _metric(m, "hybrid_kv_blocks_in_use")
        if used == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {**counts, "errors": errors[:5], "kv_blocks_in_use_at_end": used,
            "kv_blocks_total": _metric(m, "hybrid_kv_blocks_total"),
            "rss_first_mib": rss[0] / 2**20 if rss else 0.0, "rss_last_mib": rss[-1] / 2**20 if rss else 0.0,
            "rss_max_mib": max(rss) / 2**20 if rss else 0.0}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} is not in /metrics")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--clients", default="1,2,4,8,16")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--agent-turns", type=int, default=6)
    p.add_argument("--agent-system-words", type=int, default=1600, help="about 2,000 tokens with the chat template")
    p.add_argument("--soak-s", type=float, default=60.0)
    p.add_argument("--soak-clients", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", default="int4")
    p.add_argument("--serve-args", default="", help="more `hybrid serve` flags, e.g. '--max-batch 16'")
    a = p.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ["--experts", a.experts, "--threads", str(a.threads), "--max-batch", "16", "--max-queue", "64",
             *a.serve_args.split()]
    print(f"# bench.serve: {a.model} experts={a.experts} threads={a.threads} serve flags: {' '.join(extra)}; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    proc = start_server(a.model, port, extra)
    try:
        rows = concurrency(url, [int(x) for x in a.clients.split(",")], a.tokens)
        print("| clients | aggregate decode tok/s | vs 1 client | median inter-token ms | vs 1 client | "
              "median chunk gap ms | median TTFT ms | errors |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['clients']} | {r['tok_s']:.1f} | {r['tok_s_x']:.2f}x | {r['itl_ms']:.1f} | "
                  f"{r['itl_x']:.2f}x | {r['chunk_gap_ms']:.1f} | {r['ttft_ms']:.0f} | {r['errors']} |", flush=True)
        ttft = agent_loop(url, a.agent_turns, a.agent_system_words, 16)
        print("\n| agent turn | TTFT ms | vs turn 1 |\n|---|---|---|")
        for i, t in enumerate(ttft):
            print(f"| {i + 1} | {1e3 * t:.0f} | {t / ttft[0]:.2f} |", flush=True)
        if a.soak_s > 0:
            s = soak(url, proc, a.soak_clients, a.soak_s, a.tokens)
            print(f"\nsoak: {a.soak_clients} clients x {a.soak_s:.0f} s: {s['requests']} requests, "
                  f"{s['left_early']} left early, {s['failed']} failed {s['errors']}; KV blocks in use at the end "
                  f"{s['kv_blocks_in_use_at_end']:.0f} of {s['kv_blocks_total']:.0f}; server RSS after warm-up "
                  f"{s['rss_first_mib']:.0f} MiB -> {s['rss_last_mib']:.0f} MiB (max {s['rss_max_mib']:.0f})")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
