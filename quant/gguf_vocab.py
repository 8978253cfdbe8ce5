"""K2's tiktoken tokenizer as llama.cpp's GGUF vocabulary (gpt2-style BPE, pre-tokenizer "kimi-k2").

Same result as llama.cpp's convert_hf_to_gguf.py (DeepseekV2Model.set_vocab, kimi-k2 branch), without
transformers or trust_remote_code:
- tokens: every tiktoken rank as a GPT-2 byte-level string (bytes mapped through bytes_to_unicode),
  then the 256 reserved specials by name (unnamed slots "<|reserved_token_{id}|>", as
  tokenization_kimi.py names them); ids past them up to vocab_size become "[PAD{id}]" (UNUSED);
- types: ranks NORMAL, specials CONTROL (the converter flags all of them, tool-call tokens included);
- merges: rebuilt from the ranks. A token of rank r is split by running BPE over its bytes with only
  merges of rank < r; when that ends in exactly two parts, "left right" is the merge that made it.
  The list is in rank order, which is what llama.cpp reads as merge priority.
Reads tiktoken.model and tokenizer_config.json itself (quant/ must not import hybrid/).
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

RANKS_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
NUM_RESERVED_SPECIAL = 256
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5      # gguf.TokenType values


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    specials: dict[str, int]          # name -> id, all 256 reserved slots
    chat_template: str | None


@lru_cache(maxsize=None)
def _byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the `bytes_to_unicode` of every BPE port)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_to_string(token: bytes) -> str:
    enc = _byte_encoder()
    return "".join(enc[b] for b in token)


def bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Apply the merges of rank < max_rank to `token`'s bytes, lowest rank first; return the parts."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model -> {token bytes: rank}; ValueError naming the file and line when malformed."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 2:
                    raise ValueError("expected 2 fields")
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}: line {lineno} is not 'base64-token rank' ({e}); "
                                 "re-copy the file from the model release") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} with no gaps or repeats; "
                         "re-copy the file from the model release")
    return ranks


def read_vocab(model_dir: str | Path, vocab_size: int) -> GGUFVocab:
    """Build the GGUF vocabulary from a K2-format model folder.

    Args:
        model_dir: folder holding tiktoken.model and tokenizer_config.json.
        vocab_size: config.json's vocab_size (rows of the embedding); must cover ranks + 256 specials.
    Raises FileNotFoundError (a file missing) or ValueError (malformed, or sizes that disagree).
    """
    folder = Path(model_dir)
    missing = [n for n in (RANKS_FILE, CONFIG_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {', '.join(missing)} missing; a GGUF needs the tokenizer. Copy "
                                f"{RANKS_FILE} and {CONFIG_FILE} from the original K2 model folder")
    ranks = read_ranks(folder / RANKS_FILE)
    n = len(ranks)
    if vocab_size < n + NUM_RESERVED_SPECIAL:
        raise ValueError(f"{folder}: config.json vocab_size {vocab_size} is smaller than the {n} ranks of "
                         f"{RANKS_FILE} plus {NUM_RESERVED_SPECIAL} specials; the files do not belong together")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        named = {int(i): e["content"] for i, e in config.get("added_tokens_decoder", {}).items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{folder / CONFIG_FILE}: not a tokenizer config with an 'added_tokens_decoder' "
                         f"({type(e).__name__}: {e}); re-copy it from the model release") from None
    specials = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + NUM_RESERVED_SPECIAL)}

    tokens, types, merges = [""] * vocab_size, [TOKEN_UNUSED] * vocab_size, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        tokens[rank], types[rank] = token_to_string(token), TOKEN_NORMAL
        if len(token) > 1:
            parts = bpe_split(ranks, token, rank)
            if len(parts) == 2:
                merges.append(f"{token_to_string(parts[0])} {token_to_string(parts[1])}")
    for name, i in specials.items():
        tokens[i], types[i] = name, TOKEN_CONTROL
    for i in range(n + NUM_RESERVED_SPECIAL, vocab_size):
        tokens[i] = f"[PAD{i}]"
    return GGUFVocab(tokens, types, merges, specials, _chat_template(folder, config))


def _chat_template(folder: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, str) and template:
        return template
    jinja = folder / "chat_template.jinja"           # later K2 revisions ship the template as a file
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None
