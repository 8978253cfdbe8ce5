"""RuntimeOptions is the one list: hybrid.load's keywords and the generate/serve flags come from it."""
import argparse
import inspect
from dataclasses import fields

import pytest

import hybrid
from hybrid.cli import build_parser
from hybrid.core.options import RuntimeOptions


def _flags(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


def test_load_keywords_and_cli_flags_are_the_options_fields():
    names = [f.name for f in fields(RuntimeOptions)]
    params = inspect.signature(hybrid.load).parameters
    assert list(params)[1:] == names
    assert all(params[n].default == f.default for n, f in zip(names, fields(RuntimeOptions)))
    for command in ("generate", "serve"):
        flags = _flags(command)
        for f in fields(RuntimeOptions):
            assert f.name in flags, (command, f.name)
            assert flags[f.name].default == f.default and flags[f.name].choices == f.metadata["choices"]


def test_flags_parse_into_the_same_options():
    from hybrid.cli.engine_options import runtime_options
    a = build_parser().parse_args(["generate", "--gpu-expert-budget", "1024", "--transfer-budget", "2GiB",
                                   "--activations", "float", "--threads", "2"])
    assert runtime_options(a) == RuntimeOptions(gpu_expert_budget=1024, transfer_budget="2GiB",
                                                activations="float", threads=2)


def test_unknown_or_bad_options_are_refused_before_any_io(tmp_path):
    with pytest.raises(TypeError, match="unknown option.*gpu_budget.*options are device"):
        hybrid.load(tmp_path / "nowhere", gpu_budget="1GiB")
    with pytest.raises(ValueError, match="prefetch='sometimes' is not one of"):
        hybrid.load(tmp_path / "nowhere", prefetch="sometimes")
