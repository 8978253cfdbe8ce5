"""Kimi K2's tokenizer: tiktoken BPE over K2's pre-tokenization regex, plus 256 reserved specials.

A K2 model folder ships two files, read here:
  tiktoken.model         one line per mergeable token: base64(bytes), a space, the rank (0..N-1);
                         N = 163,584 for K2.
  tokenizer_config.json  `added_tokens_decoder` {"<id>": {"content": name, "special": bool, ...}}
                         names some of the 256 ids N..N+255; unnamed slots are
                         `<|reserved_token_{id}|>`. The tool-call tokens are "special": false, so they
                         survive `decode(skip_special=True)` and a tool-call parser can see them.

Encoding goes through the `tiktoken` package with K2's own pattern, as Moonshot's
tokenization_kimi.py does, so ids are bit-identical to the release. The pattern needs `&&` class
intersection: tiktoken's Rust regex supports it; Python's `regex` only with the V1 flag (plain
`regex.compile` accepts the pattern but silently drops every Latin word).
"""
from __future__ import annotations


import base64
import binascii
import codecs
import json
from pathlib import Path

import tiktoken

# K2's pre-tokenization regex (tokenization_kimi.py `pat_str`): Han runs first, then letter words with
# an o200k-like case split that excludes Han, digits in groups of at most 3, punctuation, whitespace.
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

NUM_RESERVED_SPECIAL = 256
RANKS_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"

# K2's named special tokens: offset after the last rank -> (name, "special" flag). Offsets = id - 163584
# (docs/model.md, "Tokenizer"). Offsets 5, 8 and 16 are unnamed holes in the release, as are 24..253.
K2_SPECIAL_TOKENS: dict[int, tuple[str, bool]] = {
    0: ("[BOS]", True),
    1: ("[EOS]", True),
    2: ("<|im_end|>", True),
    3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True),
    6: ("<|start_header_id|>", True),
    7: ("<|end_header_id|>", True),
    9: ("[EOT]", True),
    10: ("<|im_system|>", True),
    11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False),
    13: ("<|tool_call_begin|>", False),
    14: ("<|tool_call_argument_begin|>", False),
    15: ("<|tool_call_end|>", False),
    17: ("<|im_middle|>", True),
    22: ("<think>", True),
    23: ("</think>", True),
    254: ("[UNK]", True),
    255: ("[PAD]", True),
}

# tiktoken panics on very long runs (openai/tiktoken#195); tokenization_kimi.py cuts the text into
# pieces of at most 400k characters, each without runs over 25k (white)space characters. Same here,
# so long inputs give the release's ids.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


class TokenizerMissing(FileNotFoundError):
    """The model folder lacks the tokenizer files; the model itself still runs on token ids."""

    def __init__(self, model_dir: Path, missing: list[str]):
        self.model_dir, self.missing = model_dir, missing
        where = (f"folder {model_dir} does not exist" if not model_dir.is_dir()
                 else f"{', '.join(missing)} missing in {model_dir}")
        super().__init__(
            f"No tokenizer: {where} (needs {RANKS_FILE} and {CONFIG_FILE}, as in the Kimi K2 release). "
            "Copy them from the original model folder, or run the model on token ids: "
            "--prompt-ids 1,2,3 instead of --prompt.")


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model -> {token bytes: rank}; ValueError naming the file and line when malformed.

    The ranks must be exactly 0..N-1 (the special ids are numbered from N).
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected 2 fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}: line {lineno} is not 'base64-token rank' ({e}): "
                                 f"{line[:80]!r}. Re-copy the file from the model release.") from None
            if token in ranks:
                raise ValueError(f"{path}: line {lineno}: token {token!r} listed twice "
                                 f"(ranks {ranks[token]} and {rank}). Re-copy the file.")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} (one per line, no gaps "
                         f"or repeats); min {min(ranks.values(), default=None)}, "
                         f"max {max(ranks.values(), default=None)}. Re-copy the file.")
    return ranks


def read_specials(path: Path, n_ranks: int) -> tuple[dict[str, int], set[int], dict]:
    """tokenizer_config.json -> ({name: id} for all 256 slots, ids flagged special, the raw config)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder", {})
        named = {int(i): (entry["content"], bool(entry.get("special", True))) for i, entry in decoder.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a tokenizer config with an 'added_tokens_decoder' "
                         f"{{\"<id>\": {{\"content\": ..., \"special\": ...}}}} ({type(e).__name__}: {e}). "
                         "Re-copy it from the model release.") from None
    lo, hi = n_ranks, n_ranks + NUM_RESERVED_SPECIAL
    bad = sorted(i for i in named if not lo <= i < hi)
    if bad:
        raise ValueError(f"{path}: added token ids {bad[:5]} lie outside the special range {lo}..{hi - 1} "
                         f"that follows the {n_ranks} ranks of {RANKS_FILE}; the two files do not belong "
                         "together.")
    by_name: dict[str, int] = {}
    special_ids: set[int] = set()
    for i in range(lo, hi):
        name, special = named.get(i, (f"<|reserved_token_{i}|>", True))
        if name in by_name:
            raise ValueError(f"{path}: token name {name!r} is used by ids {by_name[name]} and {i}.")
        by_name[name] = i
        if special:
            special_ids.add(i)
    return by_name, special_ids, config


def _config_token(config: dict, key: str, default: str) -> str:
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else str(value)


def _split_long_runs(s: str, max_run: int):
    """Yield pieces of s with no run of more than max_run whitespace / non-whitespace characters."""
    run, is_space, start = 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        if ch.isspace() != is_space:
            run, is_space = 1, ch.isspace()
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class Tokenizer:
    """K2's tokenizer over tiktoken. Build with `Tokenizer.from_dir(model_dir)`.

    Example:
        >>> tok = Tokenizer.from_dir("models/tiny")
        >>> tok.decode(tok.encode("Hello WORLD")) == "Hello WORLD"
        True
    """

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int], special_ids: set[int],
                 bos: str = "[BOS]", eos: str = "[EOS]", name: str = "kimi"):
        self.n_ranks = len(ranks)
        self.vocab_size = len(ranks) + len(specials)
        self._specials = dict(specials)
        self._special_ids = frozenset(special_ids)
        self._enc = tiktoken.Encoding(name, pat_str=KIMI_PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self._specials)
        self.bos_id = self.token_id(bos)
        self.eos_id = self.token_id(eos)
        self.im_end_id = self.token_id("<|im_end|>")
        self.stop_ids: tuple[int, ...] = (self.im_end_id, self.eos_id)
        # The longest text one token stands for, in bytes: a BPE token's bytes or a special token's name (a raw
        # prompt may spell specials). A text of n characters (>= n bytes) makes at least n / this many tokens,
        # a bound that needs no tokenizing.
        self.max_token_bytes = max(max(map(len, ranks)), max((len(s.encode()) for s in specials), default=0))

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        """Read tiktoken.model + tokenizer_config.json from a model folder.

        Raises:
            TokenizerMissing: a file (or the folder) is missing.
            ValueError: a file is malformed (the message names file and line).
        """
        model_dir = Path(model_dir)
        missing = [n for n in (RANKS_FILE, CONFIG_FILE) if not (model_dir / n).is_file()]
        if missing:
            raise TokenizerMissing(model_dir, missing)
        ranks = read_ranks(model_dir / RANKS_FILE)
        specials, special_ids, config = read_specials(model_dir / CONFIG_FILE, len(ranks))
        return cls(ranks, specials, special_ids, bos=_config_token(config, "bos_token", "[BOS]"),
                   eos=_config_token(config, "eos_token", "[EOS]"), name=str(model_dir))

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding (K2's ranks, pattern and specials): what a grammar engine builds its token
        masks from."""
        return self._enc

    def token_id(self, name: str) -> int:
        """Id of a special token by name, e.g. "<|im_end|>"; KeyError naming it if unknown."""
        try:
            return self._specials[name]
        except KeyError:
            named = [n for n in self._specials if not n.startswith("<|reserved_token_")]
            raise KeyError(f"no special token named {name!r}; known names: {', '.join(named)}") from None

    def is_special(self, token_id: int) -> bool:
        """True for ids dropped by decode(skip_special=True): specials except the tool-call tokens."""
        return token_id in self._special_ids

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. No BOS is added (K2's template and encode add none).

        allow_special=False (use for anything a user typed): "<|im_end|>" inside text is encoded as
        plain text, never as the control token. allow_special=True maps special-token names to ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        kwargs = {"allowed_special": "all"} if allow_special else {"disallowed_special": ()}
        ids: list[int] = []
        for i in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i:i + _MAX_ENCODE_CHARS], _MAX_RUN_CHARS):
                ids.extend(self._enc.encode(piece, **kwargs))
        return ids

    def _check_ids(self, ids) -> list[int]:
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside 0..{self.vocab_size - 1} (vocab size "
                             f"{self.vocab_size}); is this the tokenizer of the same model?")
        return ids

    def decode_bytes(self, ids, skip_special: bool = False) -> bytes:
        """Ids -> the raw bytes they stand for (a token may hold part of a UTF-8 character)."""
        ids = self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self._enc.decode_bytes(ids)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids -> text; invalid UTF-8 becomes U+FFFD. skip_special drops control tokens but keeps the
        tool-call tokens ("special": false), so parse_tool_calls still sees them."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Incremental decoding for streaming: push ids one at a time, get only complete UTF-8 text.

    A character split across tokens (e.g. a 3-byte Han character over two byte-level tokens) comes out
    whole with the token that completes it; the concatenation of all push() results plus flush()
    equals tok.decode(all ids).

    Example:
        >>> d = StreamDecoder(tok)
        >>> "".join(d.push(i) for i in tok.encode("héllo")) + d.flush()
        'héllo'
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = False):
        self._tok, self._skip = tok, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.decode_bytes([token_id], self._skip))

    def flush(self) -> str:
        """End of stream: an incomplete character left over becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
