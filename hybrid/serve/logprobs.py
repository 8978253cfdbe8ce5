"""Log-probabilities in OpenAI's shapes, from the engine's TokenSamples (hybrid/runtime/sampler.py).

    chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
                  "refusal": null}
    completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}
A token that holds part of a UTF-8 character shows U+FFFD in "token"; "bytes" has its exact bytes.
"""
from __future__ import annotations

import math


def _token(tok, t: int) -> tuple[str, list[int]]:
    raw = tok.decode_bytes([t])
    return raw.decode("utf-8", errors="replace"), list(raw)


def _entry(tok, t: int, lp: float) -> dict:
    text, raw = _token(tok, t)
    return {"token": text, "logprob": lp, "bytes": raw}


def _top(s) -> list[tuple[int, float]]:
    """The alternatives a client can use: a grammar mask leaves forbidden tokens at -inf, which JSON cannot
    carry (and which are not alternatives)."""
    return [(t, lp) for t, lp in s.top if math.isfinite(lp)]


def chat_logprobs(tok, samples) -> dict:
    return {"content": [{**_entry(tok, s.token, s.logprob), "top_logprobs": [_entry(tok, t, lp) for t, lp in _top(s)]}
                        for s in samples], "refusal": None}


def completion_logprobs(tok, samples, offset: int = 0) -> dict:
    """offset: characters of completion text before these tokens (text_offset counts from there)."""
    tokens, offsets = [], []
    for s in samples:
        offsets.append(offset)
        text = _token(tok, s.token)[0]
        tokens.append(text)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in samples],
            "top_logprobs": [{_token(tok, t)[0]: lp for t, lp in _top(s)} for s in samples],
            "text_offset": offsets}
