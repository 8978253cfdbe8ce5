"""The shipped default model (hybrid/models/tiny_k2): trained, small, and it answers `make run`'s prompt in
words, where a random-weight model of the same shape answers in noise."""
from __future__ import annotations

import re

import hybrid
from hybrid.models.tiny import SHIPPED_TINY, ensure_default_tiny
from hybrid.text.bpe import CORPUS
from hybrid.text.chat import DEFAULT_SYSTEM, encode_chat
from train.chat_data import SELF_DESCRIPTIONS

MAKE_RUN_PROMPT = "Hello, who are you?"        # the Makefile's `make run`


def _english_share(text: str) -> float:
    """Share of the words in text that occur in the bundled corpus or the self-descriptions."""
    known = {w.lower() for w in re.findall(r"[A-Za-z']+", CORPUS.read_text() + " ".join(SELF_DESCRIPTIONS))}
    words = re.findall(r"[A-Za-z']+", text)
    return sum(w.lower() in known for w in words) / max(1, len(words))


def _answer(model_dir, n: int = 24) -> str:
    eng = hybrid.load(model_dir, device="cpu", experts="fp8", threads=1)
    ids = encode_chat(eng.tokenizer, [{"role": "system", "content": DEFAULT_SYSTEM},
                                      {"role": "user", "content": MAKE_RUN_PROMPT}])
    return eng.tokenizer.decode(eng.generate(ids, n), skip_special=True)


def test_default_model_is_the_shipped_one_and_small():
    assert ensure_default_tiny() == SHIPPED_TINY
    assert sum(f.stat().st_size for f in SHIPPED_TINY.iterdir()) < 10 * 2**20
    assert not list(SHIPPED_TINY.glob("train_state*"))


def test_shipped_model_answers_in_words(tiny_models):
    text = _answer(SHIPPED_TINY)
    assert len(re.findall(r"[A-Za-z']+", text)) >= 8, text
    assert _english_share(text) >= 0.7, text
    noise = _answer(tiny_models("k2", "fp8"))          # the same architecture with random weights
    assert _english_share(noise) < 0.5, noise
