"""The documents a reader follows are in the repository, and what they name exists.

- No tracked file sends the reader to the notes kept outside the repository (the design, kernel, K2 and
  style notes of the development machine): the facts live in docs/ (architecture, kernels, formats, model).
- Every relative link in README.md and docs/*.md resolves to a file of the repository.
- Every source path (`hybrid/profile/synth.py`) and dotted module (`hybrid.plan.planner`) named in the README,
  BENCHMARKS.md, docs/ and the profile report's templates exists.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hybrid", "quant", "cpu_experts", "gpu_attn", "train", "bench", "tests")
# The outside notes, spelled in pieces so that this file does not name them itself.
OUTSIDE = re.compile("|".join(["DESIGN" + r"\.md", "KERNEL" + "-NOTES", "K2" + "-REFERENCE", "STYLE" + r"\.md",
                               "/work/" + "shared", r"\.\./" + "shared/"]))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAMING = [*DOCS, ROOT / "BENCHMARKS.md", ROOT / "hybrid/profile/report.py", ROOT / "hybrid/profile/report_md.py"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w/.-])((?:%s)(?:/[\w.-]+)*/[\w-]+\.(?:py|md|sh))\b" % "|".join(PACKAGES))
MODULE = re.compile(r"(?<![\w/.-])((?:%s)(?:\.[a-z_][a-z0-9_]*)+)(?![\w/-])" % "|".join(PACKAGES[:-1]))
NOT_MODULES = {"py", "md", "sh", "json", "txt", "toml", "gguf", "safetensors", "model", "jinja", "pt"}
# Named on purpose in BENCHMARKS.md: a command run in an older checkout ("Fixed costs per decode token"), and a
# trial kernel that was measured but not committed ("Side measurements").
HISTORICAL = {"hybrid.calibrate", "cpu_experts.int4.to_bf16_rows"}


def tracked_files() -> list[Path]:
    """The repository's files: git's list in a checkout, else every file outside hidden and build folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".venv", "__pycache__", ".numba_cache", "runs", "build"}
        return [p for p in ROOT.rglob("*") if p.is_file()
                and not any(part in skip or part.startswith(".") for part in p.relative_to(ROOT).parts)]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        return None


def test_no_file_points_outside_the_repository():
    me = Path(__file__).resolve()
    bad = []
    for path in tracked_files():
        text = None if path.resolve() == me else text_of(path)
        for n, line in enumerate((text or "").splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "these lines point to notes outside the repository; point them to docs/ instead:\n" + "\n".join(bad)


def test_docs_exist_and_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in ("architecture", "kernels", "formats", "model"):
        assert (ROOT / "docs" / f"{page}.md").is_file()
        assert f"(docs/{page}.md)" in readme, f"README.md does not link docs/{page}.md"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            bad.append(target)
    assert not bad, f"{doc.name}: links to files that are not in the repository: {bad}"


def module_exists(dotted: str) -> bool:
    """True when `dotted` is a package, a module, or a module followed by a name its source defines."""
    parts = dotted.split(".")
    base = ROOT
    for i, part in enumerate(parts):
        if (base / part / "__init__.py").is_file():
            base = base / part
            continue
        if (base / f"{part}.py").is_file():
            source, rest = (base / f"{part}.py").read_text(), parts[i + 1:]
        else:
            source, rest = (base / "__init__.py").read_text(), parts[i:]
        return not rest or defines(source, rest[0])
    return True


def defines(source: str, name: str) -> bool:
    """True when the module source defines, imports or lists (in __all__ or a lazy table) `name`."""
    n = re.escape(name)
    return re.search(rf"(?m)^\s*(?:def|class)\s+{n}\b|^\s*{n}\s*[:=]|['\"]{n}['\"]|"
                     rf"\bimport\s+(?:\(\s*)?(?:\w+\s*,\s*)*{n}\b(?!\.)", source) is not None


def names_in(path: Path) -> tuple[set[str], set[str]]:
    text = path.read_text()
    modules = {m for m in MODULE.findall(text) if m.rsplit(".", 1)[-1] not in NOT_MODULES}
    return set(PATH.findall(text)), modules - HISTORICAL


@pytest.mark.parametrize("doc", NAMING, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_modules_exist(doc: Path):
    paths, modules = names_in(doc)
    missing = sorted(p for p in paths if not (ROOT / p).exists()) + sorted(m for m in modules if not module_exists(m))
    assert not missing, f"{doc.relative_to(ROOT)} names modules that do not exist (moved?): {missing}"


def test_the_module_check_catches_moved_names(tmp_path):
    """The check above is not vacuous: the names that went stale in issue 27 fail it."""
    stale = tmp_path / "stale.md"
    stale.write_text("routing model: hybrid/synth.py; replay through `hybrid.policies`; `hybrid.planner`\n")
    paths, modules = names_in(stale)
    assert paths == {"hybrid/synth.py"} and not (ROOT / "hybrid/synth.py").exists()
    assert {m for m in modules if not module_exists(m)} == {"hybrid.policies", "hybrid.planner"}
    assert module_exists("hybrid.plan.planner") and module_exists("hybrid.load")
