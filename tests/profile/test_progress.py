"""Progress bars: drawn with an ETA on a terminal for the long steps (trace synthesis, replay, recording, model
load), never with --quiet or when stderr is not a terminal."""
from __future__ import annotations

import io
import sys

import hybrid
from hybrid.core.progress import bar, silenced


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch) -> Terminal:
    """stderr as a terminal. Patched in the test body: pytest re-patches sys.stderr after fixtures run."""
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    return tty


def test_a_bar_shows_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    on_terminal(monkeypatch)
    assert not bar(3).disable
    assert bar(3, quiet=True).disable
    with silenced():
        assert bar(3).disable
    with silenced(False):
        assert not bar(3).disable
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert bar(3).disable


def test_profile_synth_shows_synthesis_and_replay_with_an_eta_and_quiet_silences_them(monkeypatch, tmp_path):
    terminal = on_terminal(monkeypatch)
    from hybrid.cli.profile import main
    args = ["synth", "--config", "kimi-k2", "--layers", "2", "--requests", "2", "--prompt-tokens", "32",
            "--new-tokens", "8", "--replay-layers", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    shown = terminal.getvalue()
    assert "synthesize" in shown and "replay" in shown and "100%" in shown and "<" in shown   # elapsed<remaining
    terminal.seek(0)
    terminal.truncate()
    assert main([*args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert terminal.getvalue() == ""


def test_loading_a_checkpoint_and_recording_show_progress(monkeypatch, tiny_models):
    terminal = on_terminal(monkeypatch)
    from hybrid.profile.trace import record
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu")
    assert "load experts" in terminal.getvalue() and "load dense" in terminal.getvalue()
    record(eng, [[1, 2, 3], [4, 5]], 2)
    assert "record" in terminal.getvalue()
