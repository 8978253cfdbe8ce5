"""make-tiny determinism, and the generate CLI (text and --json)."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

import hybrid
from hybrid.models.tiny import make_tiny


def _digest(d):
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_make_tiny_is_deterministic_and_seeded(tmp_path):
    a = make_tiny(tmp_path / "a", seed=3)
    b = make_tiny(tmp_path / "b", seed=3)
    c = make_tiny(tmp_path / "c", seed=4)
    assert _digest(a) == _digest(b) != _digest(c)
    assert sum(p.stat().st_size for p in a.iterdir()) < 8 * 2**20      # "a few MB"
    assert len(list(a.glob("model-*-of-*.safetensors"))) >= 3            # several shards + index
    with pytest.raises(FileExistsError, match="not empty"):
        make_tiny(a)


def test_tiny_is_block_fp8_like_the_release(tiny_models):
    from quant.checkpoint import Checkpoint
    with Checkpoint.open(tiny_models("k2", "fp8")) as ck:
        assert ck.is_fp8("model.layers.1.mlp.experts.0.gate_proj.weight")
        assert ck.is_fp8("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")      # 48 rows: a ragged block
        assert not ck.is_fp8("model.layers.1.mlp.gate.weight")                      # router stays bf16
        assert ck.dtype("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
        assert ck.get("model.layers.1.mlp.gate.e_score_correction_bias").abs().min() > 0


def _cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "hybrid", *args], capture_output=True, text=True, env=env)


def test_generate_json(tiny_models):
    r = _cli("generate", "--model", str(tiny_models("k2", "fp8")), "--prompt-ids", "1,2,3",
             "--max-new-tokens", "5", "--json", "--experts", "torch")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) == 5 and isinstance(out["text"], str)
    s = out["stats"]
    # the first new token comes from the prefill step; decode steps produce the other 4
    assert s["generated_tokens"] == 5 and s["decode_tokens"] == 4 and s["prefill_tokens"] == 3
    assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0
    act = s["expert_activations"]
    # 2 MoE layers x top-4, for 3 prompt tokens and 4 decode steps (the 5th token needs no forward)
    assert act["total"] == 2 * 4 * (3 + 4) == act["hot_set"] + act["cpu"] + act["device"]
    assert "decode" in r.stderr and "tok/s" in r.stderr


def test_generate_defaults_to_the_shipped_tiny_model(tmp_path):
    r = _cli("generate", "--prompt", "Hi", "--max-new-tokens", "3", "--experts", "torch",
             env_extra={"HYBRID_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert not any(tmp_path.iterdir())        # the trained model ships with the package: nothing is made


def test_prompt_text_without_tokenizer_is_a_clear_error(tmp_path):
    d = make_tiny(tmp_path / "m", tokenizer=False)
    eng = hybrid.load(d, device="cpu", experts="torch")
    assert eng.tokenizer is None and len(eng.generate([1, 2], 2)) == 2
    r = _cli("generate", "--model", str(d), "--prompt", "hello")
    assert r.returncode == 2 and "--prompt-ids" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("text,words", [("1,,2", "entry '' is empty"), ("1,2,", "entry '' is empty"),
                                        ("1,x", "entry 'x' is not one"), ("1,-3", "entry '-3' is not one"),
                                        (" ", "is empty")])
def test_prompt_ids_with_an_empty_or_bad_entry_are_refused(text, words, capsys):
    """Issue 28 item 13: `--prompt-ids 1,,2` was read as [1, 2]."""
    from hybrid.cli import main
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt-ids", text])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--prompt-ids" in err and words in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["build_parser", "load"])
def test_ctrl_c_while_starting_is_one_line_not_a_traceback(where, monkeypatch, capsys, tiny_models):
    """Issue 28 item 14: Ctrl-C while `hybrid generate` starts (parsing, importing, loading) printed a
    KeyboardInterrupt traceback."""
    import hybrid.cli as cli
    import hybrid.runtime.loader as loader

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    if where == "build_parser":
        monkeypatch.setattr(cli, "build_parser", interrupt)
    else:
        monkeypatch.setattr(loader, "load_with", interrupt)
    assert cli.main(["generate", "--model", str(tiny_models("k2", "fp8")), "--prompt-ids", "1"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "hybrid: interrupted"


def test_help_and_argument_errors_answer_before_the_heavy_imports():
    """Issue 28: `hybrid serve --help` took 7 s on a busy machine (torch, FastAPI and the grammar engine imported
    to build the parser). Building every parser and refusing a bad flag import none of them (the time itself is
    in BENCHMARKS: tests do not assert on wall-clock time)."""
    code = ("import sys\nfrom hybrid.cli import build_parser, main\nbuild_parser()\n"
            "try:\n    main(['serve', '--port', 'x'])\nexcept SystemExit as e:\n    assert e.code == 2\n"
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'llguidance', 'numba', 'transformers') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]" and "--port" in r.stderr
