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


@pytest.mark.parametrize("kw,words", [
    ({"threads": 1_000_000}, "threads must be an int from 1 to 256"),
    ({"kv_block_size": 10**9}, "kv_block_size must be an int from 1 to 4096"),
    ({"gpu_memory": "1e400"}, "out of range"), ({"gpu_memory": 1e400}, "out of range"),
    ({"gpu_memory": float("nan")}, "out of range"), ({"gpu_memory": "1e999GiB"}, "out of range"),
])
def test_out_of_range_numbers_are_refused_before_anything_starts(kw, words):
    """Issue 28 items 1, 8, 9: --threads above 256 started the threads before the pool's check; sizes of 1e400
    overflowed with a traceback; a KV block of 1e9 tokens allocated 576 GB."""
    from hybrid.core.options import RuntimeOptions
    with pytest.raises(ValueError, match=words):
        opts = RuntimeOptions(**kw)
        from hybrid.core.placement import parse_size
        parse_size(opts.gpu_memory)


def test_the_thread_bound_is_the_pools():
    from cpu_experts.pool import MAX_THREADS
    from hybrid.core.options import UPPER_BOUNDS
    assert UPPER_BOUNDS["threads"] == MAX_THREADS
