"""`hybrid` command line: generate, serve, profile, plan, make-tiny. Argparse front ends only: each
subcommand's module adds its parser and turns arguments into calls of the library."""
from __future__ import annotations

import argparse
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    from hybrid.cli.engine_options import HelpFormatter
    from hybrid.cli.generate import add_generate_parser
    from hybrid.cli.make_tiny import add_make_tiny_parser
    from hybrid.cli.plan import add_plan_parser
    from hybrid.cli.profile import add_profile_parser
    from hybrid.cli.serve import add_serve_parser
    p = argparse.ArgumentParser(prog="hybrid", description="Run Kimi K2 / DeepSeek-V3 with routed experts in host RAM.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_make_tiny_parser(sub)
    add_serve_parser(sub)
    add_profile_parser(sub)
    add_plan_parser(sub)
    return p


def main(argv=None) -> int:
    """The `hybrid` command: 0 on success, 2 with one line for an error the user can fix, 130 on Ctrl-C
    (wherever it lands: while importing, parsing, loading or generating; never a traceback)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("hybrid: interrupted", file=sys.stderr)
        return 130


def _run(argv) -> int:
    from hybrid.core.config import ConfigError
    from hybrid.core.errors import NonFiniteOutput
    from quant.errors import CheckpointError
    args = build_parser().parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)   # unknown config fields etc.; errors below still print
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, FileExistsError, KeyError,
            NonFiniteOutput) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"hybrid: error: {msg}", file=sys.stderr)
        return 2
