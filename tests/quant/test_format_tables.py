"""Every per-format table agrees with quant/formats.py: a format added there fails here until each table has it.

Tables keyed by format are found on the source (any dict literal with two or more format names as keys,
in any package but tests/), so a table written later is checked too; a list naming some formats must be
one of the known subsets below, with its reason. Tables built otherwise are imported and checked by name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from quant.codec import CODECS, decode, encode
from quant.formats import COMPACT_FORMATS, FORMAT_NAMES, FORMATS
from tests.source_tree import ROOT, python_files, top_packages

# Lists that name only some formats on purpose: (file, names) -> why.
SUBSETS = {
    ("cpu_experts/ir.py", ("bf16", "fp8")): "the float-activation IR kernels; int4's fast path is int8 (int4_vnni)",
    ("hybrid/models/tiny.py", ("bf16", "fp8")): "the checkpoint forms a release ships, not store formats",
    ("hybrid/cli/make_tiny.py", ("bf16", "fp8")): "the checkpoint forms a release ships, not store formats",
}


def _names(nodes, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({n.value for n in nodes if isinstance(n, ast.Constant) and n.value in names}))


def format_table_gaps(root: Path, names: tuple[str, ...]) -> list[str]:
    """'file:line: why' for every format table under `root` that does not cover exactly `names`: dict
    literals with two or more of them as keys, and lists / tuples / sets naming two or more (SUBSETS aside)."""
    gaps = []
    for pkg in top_packages(root):
        if pkg == "tests":
            continue
        for path in python_files(root, pkg):
            rel = path.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.Dict) and len(keys := _names(node.keys, names)) >= 2 and len(keys) < len(names):
                    missing = ", ".join(n for n in names if n not in keys)
                    gaps.append(f"{rel}:{node.lineno}: a table keyed by format lacks {missing}")
                elif isinstance(node, (ast.List, ast.Tuple, ast.Set)) and len(got := _names(node.elts, names)) >= 2 \
                        and (rel, got) not in SUBSETS:
                    gaps.append(f"{rel}:{node.lineno}: names formats {got}: use quant.formats.FORMAT_NAMES "
                                "(or a field of Format), or add it to SUBSETS with its reason")
    return gaps


def test_every_table_keyed_by_format_has_every_format():
    assert format_table_gaps(ROOT, FORMAT_NAMES) == []


def test_a_new_format_fails_until_every_table_has_it():
    gaps = format_table_gaps(ROOT, (*FORMAT_NAMES, "nf4"))
    for table in ("quant/codec.py", "hybrid/runtime/decode.py", "hybrid/plan/perf.py", "bench/decode.py"):
        assert any(g.startswith(table + ":") and "lacks nf4" in g for g in gaps), (table, gaps)


def test_the_checker_reports_a_partial_table_and_a_repeated_list(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "rates.py").write_text('RATE = {"int4": 1.0, "fp8": 2.0}\nALL = ("int4", "fp8", "bf16")\n'
                                               'ONE = {"bf16": 1}\n')
    assert format_table_gaps(tmp_path, FORMAT_NAMES) == [
        "pkg/rates.py:1: a table keyed by format lacks bf16",
        "pkg/rates.py:2: names formats ('bf16', 'fp8', 'int4'): use quant.formats.FORMAT_NAMES (or a field "
        "of Format), or add it to SUBSETS with its reason"]


def test_tables_built_in_code_cover_every_format():
    from cpu_experts.paths import KERNELS
    from hybrid.runtime.decode import _INTO
    from quant.dense import STORED_NAMES
    assert tuple(CODECS) == tuple(KERNELS) == tuple(_INTO) == FORMAT_NAMES
    assert all((f, "weight") in STORED_NAMES for f in FORMAT_NAMES)
    assert {f for f, _ in STORED_NAMES} == set(FORMAT_NAMES)
    smaller = [f for f in FORMAT_NAMES if FORMATS[f].nbytes(128, 128) < FORMATS["bf16"].nbytes(128, 128)]
    assert list(COMPACT_FORMATS) == smaller and "bf16" not in COMPACT_FORMATS


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_the_rounding_bound_of_each_format_holds_and_is_not_loose(fmt):
    """Format.max_rel_error (hybrid-quant verify's bound, relative to the matrix's max |w|) bounds the
    reference quantizer's error, and a normal weight comes within a factor of 4 of it."""
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    err = np.abs(decode(fmt, *encode(fmt, w)) - w).max() / np.abs(w).max()
    bound = FORMATS[fmt].max_rel_error
    assert bound / 4 < err <= bound, (err, bound)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_each_format_names_a_ggml_type(fmt):
    gguf = pytest.importorskip("gguf")
    assert FORMATS[fmt].ggml_type in gguf.GGMLQuantizationType.__members__
