"""The flags made from RuntimeOptions (every field for `hybrid generate` / `serve`; the hot-set knobs for `hybrid
plan` / `profile` too), the deprecated spellings of those knobs, and the help format every command uses."""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Callable

from hybrid.core.options import RuntimeOptions

_NO_DEFAULT_SHOWN = (None, False, argparse.SUPPRESS)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every flag's help ends with its default unless the help already names it (or
    the flag has none: None, a switch that is off, a sub-action's suppressed value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in _NO_DEFAULT_SHOWN or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """sub.add_parser with the project's HelpFormatter."""
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def add_option(p: argparse.ArgumentParser, name: str, default=MISSING, note: str = "") -> None:
    """The flag of RuntimeOptions field `name` (--gpu-expert-budget for gpu_expert_budget): its help, type,
    choices and metavar, its default unless the command gives its own; `note` is added to the help."""
    f = next(f for f in fields(RuntimeOptions) if f.name == name)
    m = f.metadata
    p.add_argument("--" + name.replace("_", "-"), dest=name, default=f.default if default is MISSING else default,
                   type=m["type"], choices=m["choices"], help=m["help"] + note, metavar=m["metavar"])


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model folder (default: the bundled tiny model)")
    for f in fields(RuntimeOptions):
        add_option(p, f.name)


def add_deprecated(p: argparse.ArgumentParser, old: str, new: str, rewrite: Callable[[str], str]) -> None:
    """Accept `old` for one release: its value is rewritten to the new flag's grammar (`rewrite`), parsed by the
    new flag's type into the same dest, and a warning on stderr names the new spelling."""
    target = next(a for a in p._actions if new in a.option_strings)
    p.add_argument(old, dest=target.dest, default=argparse.SUPPRESS, metavar=target.metavar,
                   action=_Deprecated, new=new, rewrite=rewrite, parse=target.type,
                   help=f"deprecated spelling of {new}; removed in the next release")


class _Deprecated(argparse.Action):
    def __init__(self, option_strings, dest, new: str, rewrite, parse, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.rewrite, self.parse = new, rewrite, parse

    def __call__(self, parser, namespace, values, option_string=None):
        text = self.rewrite(values)
        print(f"hybrid: warning: {option_string} {values} is deprecated and will be removed in the next release; "
              f"write {self.new} {text}", file=sys.stderr)
        try:
            setattr(namespace, self.dest, self.parse(text) if self.parse else text)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option_string}: {e}")


def runtime_options(a: argparse.Namespace) -> RuntimeOptions:
    """The RuntimeOptions the parsed flags name (checked: a bad combination raises ValueError)."""
    return RuntimeOptions(**{f.name: getattr(a, f.name) for f in fields(RuntimeOptions)})


def load_engine(a):
    """hybrid.load with the options add_engine_options defined; the tiny model when --model is absent."""
    from hybrid.models.tiny import ensure_default_tiny
    from hybrid.runtime.loader import load_with
    return load_with(a.model or ensure_default_tiny(), runtime_options(a))


def startup_summary(engine) -> str:
    """What `generate` and `serve` print once loaded: the placement plan and the CPU kernels' instruction set."""
    return f"{engine.plan.describe()}\n  CPU kernels: {engine.stats().cpu_kernels}"
