"""Style rules checked on the source: no function over MAX_LINES lines unless its docstring says why.

A function longer than that must carry a line starting with "Long:" in its docstring giving the reason
(a generated IR builder, a table of cases, ...). Tests are exempt: a test reads top to bottom.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.source_tree import ROOT, python_files, top_packages

MAX_LINES = 60


def long_functions(root: Path) -> list[str]:
    """'file:line: name (N lines)' for each function over MAX_LINES lines without a "Long:" reason."""
    found = []
    for pkg in top_packages(root):
        if pkg == "tests":
            continue
        for path in python_files(root, pkg):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > MAX_LINES and not any(line.strip().startswith("Long:") for line in doc.splitlines()):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {node.name} ({n} lines)")
    return found


def test_no_long_function_without_a_reason():
    assert long_functions(ROOT) == []


def test_the_check_catches_a_long_function_and_accepts_a_reason(tmp_path):
    (tmp_path / "pkg").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "pkg" / "a.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    '''Long: a table.'''\n{body}\n")
    assert long_functions(tmp_path) == [f"pkg/a.py:1: f ({MAX_LINES + 1} lines)"]
