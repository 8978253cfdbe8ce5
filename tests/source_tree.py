"""The project's source tree as the source checks read it (tests/test_layout.py, tests/quant/test_format_tables.py):
its top-level packages and their Python files, found on disk so a package added later is checked too."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def top_packages(root: Path) -> tuple[str, ...]:
    """Every folder at `root` holding Python files (at any depth), hidden ones (.git, .venv) left out; sorted."""
    return tuple(sorted(d.name for d in root.iterdir()
                        if d.is_dir() and not d.name.startswith(".") and next(d.rglob("*.py"), None)))


def python_files(root: Path, package: str) -> list[Path]:
    """The package's .py files, sorted."""
    return sorted((root / package).rglob("*.py"))
