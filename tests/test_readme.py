"""Every README snippet runs as pasted, and every README command line parses.

- Python snippets run one by one, each in a fresh namespace: `DIR` (the README's placeholder for a model folder)
  becomes the shipped tiny model; the client snippets (OpenAI, Anthropic) talk to `hybrid serve` started on that
  model with `--api-key sk-local` on a free loopback port, which replaces 127.0.0.1:8000.
- Command lines (`.venv/bin/hybrid ...`, `hybrid-quant`, `python -m train`, and `$ hybrid plan ...` in the
  example outputs) go through the real argument parsers, which stop right after parsing; `python -m bench.X`
  names a module that exists; `make X` a Makefile target.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MODEL = ROOT / "hybrid" / "models" / "tiny_k2"
README_URL = "http://127.0.0.1:8000"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README) if kind == lang]


def command_lines() -> list[list[str]]:
    """argv of every command in the bash blocks, and of the `$ hybrid ...` lines in the output blocks."""
    out = []
    for kind, body in BLOCK.findall(README):
        for line in body.splitlines():
            if kind == "bash":
                out.append(shlex.split(line, comments=True))
            elif line.startswith("$ hybrid "):
                out.append(["hybrid", *shlex.split(line[2:], comments=True)[1:]])
    return [argv for argv in out if argv]          # blank and comment-only lines hold no command


SNIPPETS = blocks("python")
SERVER_SNIPPETS = [s for s in SNIPPETS if README_URL in s]
LOCAL_SNIPPETS = [s for s in SNIPPETS if README_URL not in s]


def first_line(snippet: str) -> str:
    return next(ln for ln in snippet.splitlines() if not ln.startswith(("import", "from")))[:60]


def test_the_readme_has_the_snippets_this_file_runs():
    assert len(LOCAL_SNIPPETS) >= 2 and len(SERVER_SNIPPETS) == 2
    assert all('"DIR"' in s for s in LOCAL_SNIPPETS)
    assert len(command_lines()) >= 20


@pytest.mark.parametrize("snippet", LOCAL_SNIPPETS, ids=first_line)
def test_library_snippet_runs(snippet: str):
    exec(compile(snippet.replace('"DIR"', repr(str(MODEL))), "README.md", "exec"), {})


@contextlib.contextmanager
def hybrid_serve():
    """`hybrid serve` on the shipped tiny model, a free loopback port and key sk-local; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "hybrid", "serve", "--model", str(MODEL), "--host", "127.0.0.1",
                             "--port", str(port), "--api-key", "sk-local"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "hybrid serve exited before it answered /health"
            assert time.monotonic() < deadline, "hybrid serve did not answer /health within 120 s"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def server_url():
    with hybrid_serve() as url:
        yield url


@pytest.mark.parametrize("snippet", SERVER_SNIPPETS, ids=first_line)
def test_client_snippet_runs_against_hybrid_serve(snippet: str, server_url: str):
    exec(compile(snippet.replace(README_URL, server_url), "README.md", "exec"), {})


class Parsed(Exception):
    """Raised by parse_args once it has parsed: the command stops before it does anything."""


def parse_only(argv: list[str], monkeypatch) -> argparse.Namespace:
    """The namespace the real command line parser gives `argv` (SystemExit on a parse error)."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    program, *args = argv
    if program.endswith("/hybrid") or program == "hybrid":
        from hybrid.cli import main
    elif program.endswith("/hybrid-quant"):
        from quant.cli import main
    elif program.endswith("/python") and args[:2] == ["-m", "train"]:
        from train.__main__ import main
        args = args[2:]
    else:
        raise AssertionError(f"the test does not know how to parse {argv}")
    with pytest.raises(Parsed) as parsed:
        main(args)
    return parsed.value.args[0]


@pytest.mark.parametrize("argv", command_lines(), ids=shlex.join)
def test_command_line_parses(argv: list[str], monkeypatch):
    if argv[0] == "make":
        assert re.search(rf"^{re.escape(argv[1])}:", (ROOT / "Makefile").read_text(), re.M), argv
    elif argv[0].endswith("/python") and argv[2].startswith("bench."):
        assert importlib.util.find_spec(argv[2]) is not None, f"{argv[2]} does not exist"
    else:
        assert isinstance(parse_only(argv, monkeypatch), argparse.Namespace)


def test_a_wrong_flag_fails_the_parse_check(monkeypatch):
    """The parse check is not vacuous: a flag the parser does not know exits with its usage error."""
    with pytest.raises(SystemExit):
        parse_only([".venv/bin/hybrid", "generate", "--no-such-flag"], monkeypatch)
