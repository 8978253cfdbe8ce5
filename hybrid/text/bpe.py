"""A small byte-level BPE trained at make time, written in K2's tokenizer file format.

The tiny test model needs a real tokenizer of K2's shape (tiktoken ranks, K2's regex, 256 reserved
specials at K2's offsets) but a vocab of 1024, not 163,840. `tiny_ranks()` trains 512 merges on the
bundled corpus (hybrid/data/corpus.txt), so every machine builds the identical tokenizer, and
`write_tokenizer` writes it as tiktoken.model + tokenizer_config.json, which `Tokenizer.from_dir` reads.
"""
from __future__ import annotations

import base64
import json
import os
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

import regex

from hybrid.text.tokenizer import CONFIG_FILE, K2_SPECIAL_TOKENS, KIMI_PAT_STR, RANKS_FILE

CORPUS = Path(__file__).parents[1] / "data" / "corpus.txt"


def _best_pair(counts: dict[tuple[int, int], int], vocab: list[bytes]) -> tuple[int, int] | None:
    # Highest count; ties -> smallest (left bytes, right bytes), so training is deterministic.
    best, best_key = None, None
    for pair, n in counts.items():
        if n <= 0:
            continue
        key = (-n, vocab[pair[0]], vocab[pair[1]])
        if best_key is None or key < best_key:
            best, best_key = pair, key
    return best


def train_bpe(text: str, n_merges: int, pat_str: str = KIMI_PAT_STR) -> dict[bytes, int]:
    """Train byte-level BPE: ranks 0..255 are the single bytes, then one rank per new merged token.

    Args:
        text: training text; split into pre-tokens with `pat_str` (Python `regex`, V1 flag, which K2's
            `&&` class intersection needs); merges never cross a pre-token boundary.
        n_merges: new tokens to add. Fewer are added only if the text runs out of pairs.
        pat_str: pre-tokenization pattern.
    Returns:
        {token bytes: rank}, ranks contiguous from 0 (tiktoken's `mergeable_ranks`).

    Deterministic: the most frequent adjacent pair wins; ties go to the smallest (left, right) bytes.
    A merge whose bytes already exist as a token (reached by another split) reuses that token and
    does not count as a new rank. Pair counts are updated incrementally, only in the words that hold
    the merged pair: 512 merges on the 48 KB corpus take about 1 s on one core.
    """
    if n_merges < 0:
        raise ValueError(f"n_merges must be >= 0, got {n_merges}")
    words = Counter(m.encode("utf-8") for m in regex.findall(pat_str, text, flags=regex.V1))
    vocab = [bytes([b]) for b in range(256)]
    index = {tok: i for i, tok in enumerate(vocab)}
    seqs = [list(w) for w in words]
    freqs = list(words.values())
    counts, where = _pair_counts(seqs, freqs)
    added = 0
    while added < n_merges:
        pair = _best_pair(counts, vocab)
        if pair is None:
            break
        merged = vocab[pair[0]] + vocab[pair[1]]
        new = index.get(merged)
        if new is None:
            new = index[merged] = len(vocab)
            vocab.append(merged)
            added += 1
        for w in sorted(where.pop(pair)):
            seqs[w] = _recount(seqs[w], _merge(seqs[w], pair, new), freqs[w], w, counts, where)
        counts.pop(pair, None)
    return {tok: i for i, tok in enumerate(vocab)}


def _pair_counts(seqs: list[list[int]], freqs: list[int]) -> tuple[dict, dict]:
    """({adjacent pair: count weighted by word frequency}, {pair: indices of the words holding it})."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            counts[pair] += freqs[w]
            where[pair].add(w)
    return counts, where


def _merge(seq: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """`seq` with each non-overlapping occurrence of `pair`, left to right, replaced by `new`."""
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def _recount(old: list[int], new: list[int], f: int, w: int, counts: dict, where: dict) -> list[int]:
    """Move word `w`'s pair counts (weight `f`) from its `old` tokens to its `new` ones; returns `new`."""
    for p in zip(old, old[1:]):
        counts[p] -= f
    for p in zip(new, new[1:]):
        counts[p] += f
        where[p].add(w)
    return new


def write_tokenizer(model_dir, ranks: dict[bytes, int]) -> None:
    """Write tiktoken.model and tokenizer_config.json in K2's format into model_dir.

    The 256 reserved specials follow the ranks; K2's named ones sit at K2's offsets (K2_SPECIAL_TOKENS:
    [BOS] at N, [EOS] at N+1, <|im_end|> at N+2, ..., [PAD] at N+255), the tool-call tokens flagged
    "special": false. Unnamed slots are left out of added_tokens_decoder, as in the release.
    Each file is written to a temporary name and renamed when complete.
    """
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"ranks must be exactly 0..{n - 1}, one per token; got min "
                         f"{min(ranks.values(), default=None)}, max {max(ranks.values(), default=None)}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"ranks lack single bytes {missing[:8]}: text containing them could not be "
                         "encoded. Train with train_bpe, which starts from all 256 bytes.")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{base64.b64encode(tok).decode('ascii')} {r}\n"
                    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    decoder = {str(n + off): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": special}
               for off, (name, special) in sorted(K2_SPECIAL_TOKENS.items())}
    config = {
        "added_tokens_decoder": decoder,
        # tokenization_kimi.py's default list, which the release's config repeats
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>",
                                      "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
                                      "<|im_system|>", "<|im_middle|>"],
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
    }
    _write_atomic(model_dir / RANKS_FILE, lines)
    _write_atomic(model_dir / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@lru_cache(maxsize=None)
def _tiny_ranks_cached(n_merges: int) -> tuple[tuple[bytes, int], ...]:
    return tuple(train_bpe(CORPUS.read_text(encoding="utf-8"), n_merges, KIMI_PAT_STR).items())


def tiny_ranks(n_merges: int = 512) -> dict[bytes, int]:
    """The tiny model's ranks: BPE trained on the bundled corpus (256 + n_merges ranks), cached
    in-process. With n_merges=512 and write_tokenizer, the vocab is 768 + 256 = 1024."""
    return dict(_tiny_ranks_cached(n_merges))
