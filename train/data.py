"""The training mixture: sources -> K2-format tokenizer trained at make time -> token streams -> batches.

Sources (default): the standard library's code, its docs, the bundled corpus, and chat conversations made
from them (train/chat_data.py); or the text files of --data folders. Each source is split by document into
a training part and a held-out tail (~5 % of its text, whole documents where it has several), and the chat
conversations are made from training documents only, so the held-out loss is measured on unseen text.

Batches are a pure function of (seed, step): a resumed run sees exactly the batches an uninterrupted one
would. Rows of a batch are windows of seq+1 tokens from one source each, the source drawn by weight;
chat windows start at a conversation's first token so the template is seen from its start.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hybrid.text.bpe import train_bpe, write_tokenizer
from hybrid.text.chat import encode_chat
from hybrid.text.tokenizer import Tokenizer

from train.chat_data import conversations
from train.corpus import (DataError, Document, bundled_corpus, fingerprint, folder_documents, stdlib_code,
                          stdlib_docs)

# Shares of the training tokens. Code and docs dominate because K2 is a coding model and the stdlib is
# most of the text; the 38 KB corpus is small, so it is drawn rarely (the tiny recipe still sees it ~13 times).
DEFAULT_WEIGHTS = {"code": 0.45, "docs": 0.35, "corpus": 0.05, "chat": 0.15}
FOLDER_WEIGHTS = {"code": 0.4, "prose": 0.45, "chat": 0.15}
HELDOUT_SHARE = 0.05
_TOKENIZER_SAMPLE_CHARS = 1_500_000   # BPE training text; 768 merges on it take ~2 s on one core


@dataclass(frozen=True)
class DataConfig:
    """What the mixture is made of; part of a run's identity (a resume must use the same)."""
    folders: tuple[str, ...] = ()   # text folders instead of the standard library + bundled corpus
    n_merges: int = 768             # BPE merges: vocab = 256 bytes + merges + 256 specials
    chat: int = 6000                # conversations in the chat source
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return 256 + self.n_merges + 256


@dataclass
class Stream:
    """One source's tokens: train and held-out parts, each a flat int32 array with document starts."""
    name: str
    weight: float
    train: np.ndarray
    train_starts: np.ndarray
    heldout: np.ndarray
    aligned: bool = False             # windows start at a document start (chat)


@dataclass
class Dataset:
    tokenizer: Tokenizer
    streams: list[Stream]
    fingerprint: str
    stats: dict = field(default_factory=dict)

    def batch(self, seed: int, step: int, batch: int, seq: int) -> torch.Tensor:
        """[batch, seq+1] int64 windows for this step (deterministic in seed and step)."""
        rng = np.random.default_rng([seed, step])
        w = np.array([s.weight for s in self.streams])
        which = rng.choice(len(self.streams), size=batch, p=w / w.sum())
        rows = [_window(self.streams[i].train, self.streams[i].train_starts if self.streams[i].aligned else None,
                        seq + 1, rng) for i in which]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def heldout_batches(self, n: int, batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
        """n fixed [batch, seq+1] batches from the held-out parts of the non-chat sources, by weight."""
        rng = np.random.default_rng([seed, 1 << 30])
        src = [s for s in self.streams if not s.aligned and len(s.heldout) > seq + 1]
        if not src:
            raise DataError(f"no source has a held-out part longer than --seq {seq} tokens; "
                            f"use a shorter --seq or more text")
        w = np.array([s.weight for s in src])
        out = []
        for _ in range(n):
            which = rng.choice(len(src), size=batch, p=w / w.sum())
            out.append(torch.from_numpy(np.stack([_window(src[i].heldout, None, seq + 1, rng) for i in which])
                                        .astype(np.int64)))
        return out


def _window(ids: np.ndarray, starts: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    last = len(ids) - n
    if starts is not None:
        ok = starts[starts <= last]
        return ids[int(rng.choice(ok)):][:n]
    s = int(rng.integers(0, last + 1))
    return ids[s:s + n]


def build_dataset(cfg: DataConfig, tokenizer_dir: Path, quiet: bool = True) -> Dataset:
    """Read the sources, train (or reuse) the tokenizer in tokenizer_dir, tokenize.

    The tokenizer is trained once per run and written to tokenizer_dir (tiktoken.model +
    tokenizer_config.json); when those files exist they are reused, so a resumed run keeps its ids.
    """
    sources = _sources(cfg)
    train_docs = {k: v[0] for k, v in sources.items()}
    heldout_docs = {k: v[1] for k, v in sources.items()}
    fp = hashlib.sha256(repr(cfg).encode())
    for k in sorted(sources):
        fp.update(f"{k}:{fingerprint(train_docs[k])}:{fingerprint(heldout_docs[k])}".encode())
    tok = _tokenizer(cfg, train_docs, Path(tokenizer_dir), quiet)
    weights = FOLDER_WEIGHTS if cfg.folders else DEFAULT_WEIGHTS
    streams = [_stream(k, weights[k], tok, train_docs[k], heldout_docs[k]) for k in sorted(sources)]
    code = train_docs.get("code", [])
    prose = train_docs.get("corpus") or train_docs.get("prose") or []
    chats = conversations(code, prose, cfg.chat, cfg.seed)
    ids = [encode_chat(tok, c, add_generation_prompt=False) for c in chats]
    streams.append(Stream("chat", weights["chat"], *_concat(ids, tok.eos_id), np.zeros(0, np.int32), aligned=True))
    streams = [s for s in streams if len(s.train)]
    stats = {s.name: {"train_tokens": int(len(s.train)), "heldout_tokens": int(len(s.heldout)),
                      "weight": s.weight} for s in streams}
    return Dataset(tok, streams, fp.hexdigest()[:16], stats)


def _sources(cfg: DataConfig) -> dict[str, tuple[list[Document], list[Document]]]:
    if cfg.folders:
        docs = [d for f in cfg.folders for d in folder_documents(Path(f))]
        parts = {"code": [d for d in docs if d.name.endswith(".py")],
                 "prose": [d for d in docs if not d.name.endswith(".py")]}
    else:
        code = stdlib_code()
        if not code:
            raise DataError("found no standard-library source to train on; pass --data FOLDER of text files")
        parts = {"code": code, "docs": stdlib_docs(code), "corpus": bundled_corpus()}
    return {k: split_heldout(v) for k, v in parts.items() if v}


def split_heldout(docs: list[Document], share: float = HELDOUT_SHARE) -> tuple[list[Document], list[Document]]:
    """(train, held out): documents in a fixed pseudo-random order (crc32 of the name; a docstrings file is
    keyed like its module, so held-out modules and held-out docstrings mostly coincide: with the tiny
    recipe's data, 4 of the 15 held-out modules are not among the held-out docstring files); the last ones
    holding `share` of the text are held out. A single document is cut at 1 - share of its text."""
    if len(docs) == 1:
        d = docs[0]
        cut = int(len(d.text) * (1 - share))
        return [Document(d.name, d.text[:cut])], [Document(d.name + "#tail", d.text[cut:])]
    order = sorted(docs, key=lambda d: (zlib.crc32(d.name.removeprefix("docstrings/").encode()), d.name))
    total, acc, k = sum(len(d.text) for d in docs), 0, len(order)
    while k > 1 and acc < share * total:
        k -= 1
        acc += len(order[k].text)
    return order[:k], order[k:]


def _tokenizer(cfg: DataConfig, docs: dict[str, list[Document]], folder: Path, quiet: bool) -> Tokenizer:
    if not (folder / "tiktoken.model").is_file():
        text = _tokenizer_sample(docs, FOLDER_WEIGHTS if cfg.folders else DEFAULT_WEIGHTS, cfg.seed)
        if not quiet:
            print(f"training the tokenizer: {cfg.n_merges} merges on {len(text) / 1e6:.1f} M characters", flush=True)
        write_tokenizer(folder, train_bpe(text, cfg.n_merges))
    tok = Tokenizer.from_dir(folder)
    if tok.vocab_size != cfg.vocab_size:
        raise DataError(f"{folder}: the tokenizer there has vocab {tok.vocab_size}, but this run asks for "
                        f"{cfg.vocab_size} (--merges {cfg.n_merges}); use the run's own --merges or a new --out")
    return tok


def _tokenizer_sample(docs: dict[str, list[Document]], weights: dict[str, float], seed: int) -> str:
    """Up to _TOKENIZER_SAMPLE_CHARS of training text, each source by its share, documents in a seeded order."""
    rng = np.random.default_rng(seed)
    total = sum(weights[k] for k in docs)
    parts = []
    for k in sorted(docs):
        budget = int(_TOKENIZER_SAMPLE_CHARS * weights[k] / total)
        for i in rng.permutation(len(docs[k])):
            if budget <= 0:
                break
            t = docs[k][int(i)].text[:budget]
            parts.append(t)
            budget -= len(t)
    return "\n\n".join(parts)


def _stream(name: str, weight: float, tok: Tokenizer, train: list[Document], heldout: list[Document]) -> Stream:
    ids, starts = _concat([tok.encode(d.text) for d in train], tok.eos_id)
    held, _ = _concat([tok.encode(d.text) for d in heldout], tok.eos_id)
    return Stream(name, weight, ids, starts, held)


def _concat(docs: list[list[int]], sep: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents joined with [EOS] after each -> (ids int32, start offset of each document)."""
    starts, n = [], 0
    for d in docs:
        starts.append(n)
        n += len(d) + 1
    ids = np.empty(n, np.int32)
    for s, d in zip(starts, docs):
        ids[s:s + len(d)] = d
        ids[s + len(d)] = sep
    return ids, np.array(starts, np.int64)
