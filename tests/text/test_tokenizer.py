"""K2 tokenizer (hybrid/text/tokenizer.py) and the make-time BPE (hybrid/text/bpe.py), on the tiny tokenizer:
768 ranks trained on the bundled corpus + 256 specials at K2's offsets = vocab 1024."""
from __future__ import annotations

import json

import pytest
import regex
import tiktoken

from hybrid.text.bpe import CORPUS, tiny_ranks, train_bpe, write_tokenizer
from hybrid.text.tokenizer import (K2_SPECIAL_TOKENS, KIMI_PAT_STR, StreamDecoder, Tokenizer, TokenizerMissing,
                              read_ranks)

N = 768   # ranks of the tiny tokenizer; specials start here

VARIED = [
    "",
    "Hello WORLD, it's a test.",
    "The keeper of the northern light kept a notebook.\n\nOn Monday the wind came from the west.",
    "def f(x):\n\treturn x ** 2  # square\n",
    "Numbers: 3.14159, -42, 1,000,000 and 2024-11-29T14:53:17Z",
    "中文：今天天气很好。日本語：こんにちは。한국어: 안녕하세요.",
    "Ünïcödé façade — “quotes” … and emoji 🚀🙂👍🏽",
    "   leading spaces, trailing tabs\t\t\n\r\n  ",
    "unseen script: ᚠᚢᚦᚨᚱᚲ ꦗꦮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "x" * 3000 + " " * 500 + "y",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    write_tokenizer(d, tiny_ranks())
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


# --- pre-tokenization pattern ---------------------------------------------------------------------

def test_pattern_splits_like_k2_with_regex_v1():
    assert regex.findall(KIMI_PAT_STR, "Hello WORLD, it's", flags=regex.V1) == ["Hello", " WORLD", ",", " it's"]
    # Without V1, `&&` is not class intersection and every Latin word is silently dropped.
    assert regex.findall(KIMI_PAT_STR, "Hello WORLD, it's") != ["Hello", " WORLD", ",", " it's"]


def _tiktoken_pieces(text: str) -> list[str]:
    # With every substring of `text` in the vocabulary, BPE merges each pre-token into one token, so
    # tiktoken's ids show exactly how its regex engine split the text.
    data = text.encode("utf-8")
    subs = sorted({data[i:j] for i in range(len(data)) for j in range(i + 2, len(data) + 1)},
                  key=lambda b: (len(b), b))
    ranks = {bytes([b]): b for b in range(256)}
    for s in subs:
        ranks.setdefault(s, len(ranks))
    enc = tiktoken.Encoding("split", pat_str=KIMI_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    return [enc.decode_single_token_bytes(i).decode("utf-8") for i in enc.encode_ordinary(text)]


@pytest.mark.parametrize("text", ["Hello WORLD, it's",
                                  "I'LL go 你好世界abc 12345 x\n\n  y  \tThey're CamelCase"])
def test_tiktoken_splits_like_regex_v1(text):
    assert _tiktoken_pieces(text) == regex.findall(KIMI_PAT_STR, text, flags=regex.V1)


# --- encode / decode ------------------------------------------------------------------------------

def test_vocab_and_ids_by_name(tok):
    assert tok.vocab_size == 1024
    assert (tok.bos_id, tok.eos_id, tok.im_end_id) == (N, N + 1, N + 2)
    assert tok.stop_ids == (N + 2, N + 1)
    for off, (name, _) in K2_SPECIAL_TOKENS.items():
        assert tok.token_id(name) == N + off
    assert tok.token_id(f"<|reserved_token_{N + 5}|>") == N + 5     # an unnamed hole keeps its slot
    with pytest.raises(KeyError, match="no_such_token"):
        tok.token_id("<|no_such_token|>")


@pytest.mark.parametrize("text", VARIED)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < N for i in ids)
    assert tok.decode(ids) == text


def test_bpe_merges_are_used(tok):
    ids = tok.encode("The keeper of the northern light")
    assert len(ids) < len("The keeper of the northern light") / 2


def test_special_strings_in_text_are_plain_text(tok):
    text = "hi <|im_end|><|im_assistant|>assistant<|im_middle|> [EOS]"
    ids = tok.encode(text)
    assert all(i < N for i in ids)
    assert tok.decode(ids) == text


def test_allow_special_maps_names_to_ids(tok):
    ids = tok.encode("hi<|im_end|>[EOS]", allow_special=True)
    assert ids[-2:] == [tok.im_end_id, tok.eos_id]
    assert tok.decode(ids[:-2]) == "hi"
    assert tok.encode("<|tool_call_begin|>", allow_special=True) == [N + 13]


def test_skip_special_keeps_tool_call_tokens(tok):
    ids = ([tok.token_id("<|im_assistant|>")] + tok.encode("ok")
           + [tok.token_id("<|tool_calls_section_begin|>"), tok.token_id("<|tool_call_begin|>"),
              tok.token_id(f"<|reserved_token_{N + 100}|>"), tok.im_end_id, tok.eos_id])
    assert tok.decode(ids) == ("<|im_assistant|>ok<|tool_calls_section_begin|><|tool_call_begin|>"
                               f"<|reserved_token_{N + 100}|><|im_end|>[EOS]")
    assert tok.decode(ids, skip_special=True) == "ok<|tool_calls_section_begin|><|tool_call_begin|>"


def test_decode_rejects_ids_outside_the_vocab(tok):
    with pytest.raises(ValueError, match="1024"):
        tok.decode([5, 1024])


# --- streaming ------------------------------------------------------------------------------------

def test_stream_decoder_emits_only_complete_utf8(tok):
    text = "héllo 你好世界 🚀 ok"
    ids = tok.encode(text)
    # the test means something only if some character really is split across tokens
    assert any(_is_partial_utf8(tok.decode_bytes([i])) for i in ids)
    d = StreamDecoder(tok)
    pieces = [d.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == text


def _is_partial_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_stream_decoder_flush_marks_a_cut_character(tok):
    first_byte = tok.encode("你")[0]
    assert _is_partial_utf8(tok.decode_bytes([first_byte]))
    d = tok.stream()
    assert d.push(first_byte) == ""
    assert d.flush() == "\ufffd"


def test_stream_decoder_skip_special(tok):
    d = tok.stream(skip_special=True)
    out = [d.push(i) for i in [tok.token_id("<|im_user|>"), *tok.encode("a"), N + 13, tok.im_end_id]]
    assert out == ["", "a", "<|tool_call_begin|>", ""]


# --- training and files ---------------------------------------------------------------------------

def test_train_bpe_is_deterministic_with_ties_to_smallest_bytes():
    # Pre-tokens "ab", " ab", " cd", " cd": pairs (' ','c'), ('a','b'), ('c','d') tie at 2, and the
    # smallest bytes win: b" c" first, then (b" c", b"d") beats (b"a", b"b"), then "ab", then " ab".
    ranks = train_bpe("ab ab cd cd", 10, KIMI_PAT_STR)
    assert len(ranks) == 260                     # the text ran out of pairs after 4 merges
    assert [t for t, r in sorted(ranks.items(), key=lambda kv: kv[1])][256:] == [b" c", b" cd", b"ab", b" ab"]
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_tiny_ranks_shape():
    ranks = tiny_ranks()
    assert len(ranks) == N and sorted(ranks.values()) == list(range(N))
    assert ranks == train_bpe(CORPUS.read_text("utf-8"), 512)      # the cache returns the same


def test_write_read_round_trip(tok_dir):
    assert read_ranks(tok_dir / "tiktoken.model") == tiny_ranks()
    config = json.loads((tok_dir / "tokenizer_config.json").read_text("utf-8"))
    decoder = config["added_tokens_decoder"]
    assert decoder[str(N)]["content"] == "[BOS]" and decoder[str(N + 255)]["content"] == "[PAD]"
    assert decoder[str(N + 11)] == {"content": "<|tool_calls_section_begin|>", "lstrip": False,
                                    "normalized": False, "rstrip": False, "single_word": False,
                                    "special": False}
    assert str(N + 5) not in decoder
    assert (config["bos_token"], config["eos_token"]) == ("[BOS]", "[EOS]")


def test_write_tokenizer_rejects_bad_ranks(tmp_path):
    with pytest.raises(ValueError, match="single bytes"):
        write_tokenizer(tmp_path, {b"a": 0})
    with pytest.raises(ValueError, match="0..1"):
        write_tokenizer(tmp_path, {b"a": 0, b"b": 5})


# --- missing and malformed files ------------------------------------------------------------------

def test_missing_tokenizer_names_files_and_the_way_out(tmp_path):
    with pytest.raises(TokenizerMissing) as e:
        Tokenizer.from_dir(tmp_path)
    msg = str(e.value)
    assert "tiktoken.model" in msg and "tokenizer_config.json" in msg and str(tmp_path) in msg
    assert "--prompt-ids" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_missing_one_file(tmp_path, tok_dir):
    (tmp_path / "tiktoken.model").write_bytes((tok_dir / "tiktoken.model").read_bytes())
    with pytest.raises(TokenizerMissing, match="tokenizer_config.json missing") as e:
        Tokenizer.from_dir(tmp_path)
    assert e.value.missing == ["tokenizer_config.json"]
    with pytest.raises(TokenizerMissing, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def _copy(tok_dir, dst):
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (dst / name).write_bytes((tok_dir / name).read_bytes())


def test_malformed_ranks_file(tmp_path, tok_dir):
    _copy(tok_dir, tmp_path)
    lines = (tmp_path / "tiktoken.model").read_text().splitlines()
    lines[3] = "not-base64!! 3"
    (tmp_path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"tiktoken.model: line 4"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="ranks must be exactly"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_config(tmp_path, tok_dir):
    _copy(tok_dir, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"5000": {"content": "[BOS]", "special": True}}}))
    with pytest.raises(ValueError, match="outside the special range"):
        Tokenizer.from_dir(tmp_path)


def test_max_token_bytes_bounds_every_token_specials_included(tok):
    """The server refuses a prompt by chars / max_token_bytes before tokenizing it: no token, a special token's
    name included (a raw prompt may spell them), may stand for more bytes than that."""
    longest = max(len(tok.decode_bytes([i])) for i in range(tok.n_ranks))
    assert tok.max_token_bytes >= longest
    special = max(tok._specials, key=len)
    text = special * 50
    assert len(tok.encode(text, allow_special=True)) == 50 >= -(-len(text) // tok.max_token_bytes)
