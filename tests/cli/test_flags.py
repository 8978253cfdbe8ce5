"""Every command's flags: one vocabulary for the hot-set knobs, the old spellings deprecated, help and defaults
on every flag of every parser."""
import argparse

import pytest

from hybrid.cli import build_parser
from hybrid.cli.engine_options import HelpFormatter
from hybrid.core.knobs import HotSetSize, TransferBudget
from quant.cli import build_parser as quant_parser

# each command that sizes or moves the hot set, with what it needs besides the two knobs
KNOB_COMMANDS = {
    "generate": ["generate"], "serve": ["serve"], "plan": ["plan"], "profile": ["profile"],
    "profile analyze": ["profile", "analyze", "t.npz", "--out", "o"],
    "profile synth": ["profile", "synth", "--out", "o"],
}


def _parsers(p: argparse.ArgumentParser, name: str):
    """(name, parser) for `p` and every sub-command under it."""
    yield name, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub_name, sub in a.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def undocumented(p: argparse.ArgumentParser) -> list[str]:
    """Flags of `p` with no help, and defaulted flags whose rendered help does not show the default (a
    suppressed default, a flag that sets nothing unless given, has none to show)."""
    bad = []
    formatter = p._get_formatter()
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        label = "/".join(a.option_strings) or a.dest
        if not a.help:
            bad.append(f"{label}: no help")
        elif a.default not in (None, False, argparse.SUPPRESS) and a.option_strings and \
                "default" not in formatter._expand_help(a).lower():
            bad.append(f"{label}: help does not show its default {a.default!r}")
    return bad


@pytest.mark.parametrize("prog, parser", [("hybrid", build_parser), ("hybrid-quant", quant_parser)])
def test_every_flag_has_help_and_shows_its_default(prog, parser):
    found = {name: undocumented(p) for name, p in _parsers(parser(), prog)}
    assert len(found) >= 5
    assert {k: v for k, v in found.items() if v} == {}


def test_the_check_catches_a_flag_without_help_or_default():
    p = argparse.ArgumentParser(formatter_class=argparse.HelpFormatter)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--count", type=int, default=3, help="how many")
    p.add_argument("--named", default="x", help="a name (default x)")
    assert undocumented(p) == ["--quiet: no help", "--count: help does not show its default 3"]
    q = argparse.ArgumentParser(formatter_class=HelpFormatter)       # the project's: shows it by itself
    q.add_argument("--count", type=int, default=3, help="how many")
    assert undocumented(q) == [] and "(default: 3)" in q.format_help()


def test_generate_help_shows_the_defaults_the_issue_named():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["generate"].format_help().split())
    assert "(default: 32)" in text and "'Hello!'" in text and "(default: 8)" in text


@pytest.mark.parametrize("command", KNOB_COMMANDS)
def test_one_value_means_the_same_in_every_command(command):
    a = build_parser().parse_args([*KNOB_COMMANDS[command], "--gpu-expert-budget", "38/layer",
                                   "--transfer-budget", "0.25/layer"])
    assert a.gpu_expert_budget == HotSetSize.experts(38)
    assert a.transfer_budget == TransferBudget.copies(0.25)
    b = build_parser().parse_args([*KNOB_COMMANDS[command], "--gpu-expert-budget", "10%"])
    assert b.gpu_expert_budget == HotSetSize("share", 0.10)


def test_the_knob_flags_share_one_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for flag in ("--gpu-expert-budget", "--transfer-budget"):
        helps = [a.help for name in ("generate", "plan", "profile") for a in sub.choices[name]._actions
                 if flag in a.option_strings]
        assert len(helps) == 3 and all(h.startswith(helps[0]) for h in helps), flag


@pytest.mark.parametrize("args, dest, value, new", [
    (["plan", "--hot-set", "38"], "gpu_expert_budget", HotSetSize.experts(38), "--gpu-expert-budget 38/layer"),
    (["plan", "--hot-set", "10%"], "gpu_expert_budget", HotSetSize("share", 0.1), "--gpu-expert-budget 10%"),
    (["plan", "--hot-set", "auto"], "gpu_expert_budget", HotSetSize("auto"), "--gpu-expert-budget auto"),
    (["plan", "--transfer-budget", "0.5"], "transfer_budget", TransferBudget.copies(0.5),
     "--transfer-budget 0.5/layer"),
    (["profile", "--budget", "0.25"], "gpu_expert_budget", HotSetSize("share", 0.25), "--gpu-expert-budget 25%"),
    (["profile", "analyze", "t.npz", "--out", "o", "--budget", "38"], "gpu_expert_budget", HotSetSize.experts(38),
     "--gpu-expert-budget 38/layer"),
    (["profile", "synth", "--out", "o", "--budget", "5%"], "gpu_expert_budget", HotSetSize("share", 0.05),
     "--gpu-expert-budget 5%"),
    (["profile", "--loads-per-token", "0.5"], "transfer_budget", TransferBudget.copies(0.5),
     "--transfer-budget 0.5/layer"),
    (["profile", "--loads-per-token", "inf"], "transfer_budget", TransferBudget("unlimited"),
     "--transfer-budget unlimited"),
])
def test_old_spellings_parse_with_a_deprecation_naming_the_new_flag(capsys, args, dest, value, new):
    a = build_parser().parse_args(args)
    assert getattr(a, dest) == value
    err = capsys.readouterr().err
    assert "deprecated" in err and new in err


def test_a_bad_old_value_is_refused_with_the_new_grammar(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--hot-set", "lots"])
    assert "cannot read --gpu-expert-budget 'lots'; write bytes" in capsys.readouterr().err


def test_new_spellings_print_no_warning(capsys):
    build_parser().parse_args(["plan", "--gpu-expert-budget", "38/layer", "--transfer-budget", "0.5/layer"])
    assert capsys.readouterr().err == ""
