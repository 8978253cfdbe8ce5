"""The package rules, checked on the source: which package and subpackage may import which.

    hybrid:      core < text < models < runtime < profile < plan < serve < cli  (lower never imports higher);
                 every subpackage and module of hybrid is in one of these layers (or is the package itself)
    torch-free:  hybrid (the package itself), hybrid.core, hybrid.text and cpu_experts never load torch, not
                 even through another package (gpu_attn, quant.dense, ...): any import of theirs, then the
                 closure of the module-level imports it runs (a function's own import runs when it is called)
    cpu_experts: never hybrid or gpu_attn (numpy + Numba; it may use quant)
    quant:       nothing of the project (a leaf)
    gpu_attn:    torch and the standard library only
    train:       may import anything of the project; nothing imports train but bench and tests
    bench/tests: may import anything; nothing else imports them
The packages are the folders at the root that hold Python files, found on disk, so a new one is checked too.
Every import counts, also one inside a function (a lazy import is still a dependency) and
importlib.import_module("name") / __import__("name") with a literal name.
"""
from __future__ import annotations

import ast
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.source_tree import ROOT, python_files, top_packages

LAYERS = ("core", "text", "models", "runtime", "profile", "plan", "serve", "cli")
FACADE = ("hybrid", "hybrid.__main__")                  # the package itself and `python -m hybrid`: above every layer
TORCH_FREE = ("hybrid.core", "hybrid.text", "cpu_experts")
OUTSIDE = ("bench", "tests")                            # may import anything; the library never imports them


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _dynamic_import(node: ast.Call) -> str | None:
    """The literal module name of importlib.import_module("x") / import_module("x") / __import__("x"), else None."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


@dataclass(frozen=True)
class Import:
    line: int
    target: str             # absolute module name (`from m import x`: m, or m.x for a relative or `from . import`)
    eager: bool             # runs when the module is imported (False: inside a function)


def _in_functions(tree: ast.AST) -> set[int]:
    """ids of the nodes inside a function or lambda body (they run when it is called, not on import)."""
    return {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for n in ast.walk(f) if n is not f}


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in the file, relative ones resolved, literal dynamic ones included."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    lazy = _in_functions(tree)
    return [Import(line, target, id(node) not in lazy) for node in ast.walk(tree)
            for line, target in _targets(node, package)]


def _targets(node: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of what one AST node imports (none for most nodes); `package` resolves
    relative imports."""
    if isinstance(node, ast.Import):
        return [(node.lineno, a.name) for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if not node.level:
            return [(node.lineno, node.module)] if node.module else []
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
        return [(node.lineno, f"{target}.{a.name}") for a in node.names]   # `from . import x` may be a module
    if isinstance(node, ast.Call) and (name := _dynamic_import(node)) and not name.startswith("."):
        return [(node.lineno, name)]
    return []


@dataclass(frozen=True)
class Tree:
    """The project's modules under one root: module name -> file, and each module's imports."""
    root: Path
    packages: tuple[str, ...]                          # the top-level packages (tests.source_tree.top_packages)
    files: dict[str, Path]
    imports: dict[str, list[Import]]

    @classmethod
    def read(cls, root: Path) -> "Tree":
        packages = top_packages(root)
        files = {module_name(p, root): p for pkg in packages for p in python_files(root, pkg)}
        return cls(root, packages, files, {m: imports_of(p, root) for m, p in files.items()})

    def loads(self, target: str) -> list[str]:
        """The project modules that importing `target` runs: the module (or, for `from pkg import name`, the
        package) and every package above it."""
        parts = target.split(".")
        return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in self.files]

    def torch_chain(self, start: str) -> list[str] | None:
        """The shortest chain of module-level imports from project module `start` to one that imports torch
        on import, or None: what importing `start` runs."""
        seen, frontier = {start: [start]}, [start]
        while frontier:
            nxt = []
            for mod in frontier:
                for imp in filter(lambda i: i.eager, self.imports[mod]):
                    if imp.target.split(".")[0] == "torch":
                        return seen[mod]
                    for m in self.loads(imp.target):
                        if m not in seen:
                            seen[m] = seen[mod] + [m]
                            nxt.append(m)
            frontier = nxt
        return None


def _torch_free(mod: str) -> bool:
    return mod == "hybrid" or any(mod == p or mod.startswith(p + ".") for p in TORCH_FREE)


def _layer(mod: str) -> int | None:
    """The layer index of a hybrid module (len(LAYERS) for the facade), None outside every layer."""
    parts = mod.split(".")
    if parts[0] != "hybrid":
        return None
    if mod in FACADE:
        return len(LAYERS)
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def violations(root: Path) -> list[str]:
    """Every broken rule under `root` (a folder holding the project's packages), as 'file:line: why'."""
    tree = Tree.read(root)
    found = []
    for src, path in tree.files.items():
        rel = path.relative_to(root).as_posix()
        if src.split(".")[0] == "hybrid" and _layer(src) is None:
            found.append(f"{rel}:1: {src} is not in a layer ({', '.join(LAYERS)}): put it in one, or add its "
                         "subpackage to LAYERS here and to hybrid/__init__.py's docstring")
        for imp in tree.imports[src]:
            why = _broken(src, imp.target, tree.packages) or _back_door_torch(tree, src, imp.target)
            if why:
                found.append(f"{rel}:{imp.line}: {src} imports {imp.target}: {why}")
    return found


def _back_door_torch(tree: Tree, src: str, target: str) -> str | None:
    """Why importing `target` loads torch into torch-free `src`, when it does (reported where the import
    leaves the torch-free modules; one inside them is reported at its own imports)."""
    if not _torch_free(src) or target.split(".")[0] == "torch":
        return None
    for m in tree.loads(target):
        chain = None if _torch_free(m) else tree.torch_chain(m)
        if chain:
            return f"{src} is torch-free, but this loads torch: {' -> '.join(chain)} imports torch"
    return None


def _broken(src: str, target: str, packages: tuple[str, ...]) -> str | None:
    top, ttop = src.split(".")[0], target.split(".")[0]
    if ttop == "train" and top not in ("train", *OUTSIDE):
        return f"nothing imports train but {' and '.join(OUTSIDE)}"
    if ttop in OUTSIDE and top not in OUTSIDE:
        return "the library never imports bench or tests"
    if _torch_free(src) and ttop == "torch":
        return "hybrid, hybrid.core, hybrid.text and cpu_experts are torch-free"
    if top == "cpu_experts" and ttop in ("hybrid", "gpu_attn"):
        return "cpu_experts never imports hybrid or gpu_attn"
    if top == "quant" and ttop in packages and ttop != "quant":
        return "quant imports nothing of the project"
    if top == "gpu_attn" and ttop != "gpu_attn" and ttop not in sys.stdlib_module_names and ttop != "torch":
        return "gpu_attn imports only torch and the standard library"
    if top == "hybrid" and ttop == "hybrid":
        a, b = _layer(src), _layer(target)
        if b is None:
            return f"{target} is not in a layer ({', '.join(LAYERS)})"
        if a is not None and b > a:
            higher = LAYERS[b] if b < len(LAYERS) else "hybrid (the facade: import the module that defines it)"
            return f"{LAYERS[a]} may not import the higher layer {higher}"
    return None


# ---- the project --------------------------------------------------------------------------------------------
def test_the_project_keeps_its_import_rules():
    assert violations(ROOT) == []


def test_the_layer_list_is_the_one_hybrid_documents():
    doc = ast.get_docstring(ast.parse((ROOT / "hybrid" / "__init__.py").read_text()))
    assert " < ".join(LAYERS) in doc, "LAYERS here and hybrid/__init__.py's docstring name the same order"


# ---- the checker: each plant in a copy of the project is reported, and nothing else --------------------------
@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """The project's Python files, copied: each test plants files in it and removes them again."""
    out = tmp_path_factory.mktemp("project")
    for pkg in top_packages(ROOT):
        for p in python_files(ROOT, pkg):
            dst = out / p.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
    return out


PLANTS = {
    "torch through gpu_attn into hybrid.core": (
        {"hybrid/core/planted.py": "import gpu_attn\n"},
        "hybrid/core/planted.py:1: hybrid.core.planted imports gpu_attn: hybrid.core.planted is torch-free, but "
        "this loads torch: gpu_attn -> gpu_attn.mla imports torch"),
    "torch through quant into cpu_experts, lazily": (
        {"cpu_experts/planted.py": "def f():\n    from quant.dense import DenseReader\n"},
        "cpu_experts/planted.py:2: cpu_experts.planted imports quant.dense: cpu_experts.planted is torch-free, "
        "but this loads torch: quant.dense imports torch"),
    "importlib into a higher layer": (
        {"hybrid/runtime/planted.py": 'import importlib\n\n\ndef f():\n    return importlib.import_module("hybrid.serve")\n'},
        "hybrid/runtime/planted.py:5: hybrid.runtime.planted imports hybrid.serve: runtime may not import the "
        "higher layer serve"),
    "__import__ into a higher layer": (
        {"hybrid/core/planted.py": 'CLI = __import__("hybrid.cli")\n'},
        "hybrid/core/planted.py:1: hybrid.core.planted imports hybrid.cli: core may not import the higher layer cli"),
    "a subpackage missing from the layer list": (
        {"hybrid/extras/__init__.py": "", "hybrid/extras/tools.py": "from hybrid.cli import main\n"},
        "hybrid/extras/__init__.py:1: hybrid.extras is not in a layer"),
    "a new top-level package importing train": (
        {"newpkg/__init__.py": "", "newpkg/run.py": "def f():\n    import train.loop\n"},
        "newpkg/run.py:2: newpkg.run imports train.loop: nothing imports train but bench and tests"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_each_plant_is_reported(project_copy, plant):
    files, expected = PLANTS[plant]
    made = {d for rel in files for d in (project_copy / rel).parents if not d.exists()}
    try:
        for rel, text in files.items():
            (project_copy / rel).parent.mkdir(parents=True, exist_ok=True)
            (project_copy / rel).write_text(text)
        got = violations(project_copy)
    finally:
        for rel in files:
            (project_copy / rel).unlink()
        for d in sorted(made, key=lambda d: -len(d.parts)):
            d.rmdir()
    assert got and all(g.split(":")[0] in files for g in got), got       # only the planted files are reported
    assert any(g.startswith(expected) for g in got), got


def test_an_unlisted_subpackage_is_reported_at_each_of_its_modules_and_imports(tmp_path):
    for rel, text in {"hybrid/__init__.py": "", "hybrid/cli/__init__.py": "", "hybrid/extras/__init__.py": "",
                      "hybrid/extras/tools.py": "from hybrid.cli import main\n", "hybrid/stray.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    got = violations(tmp_path)
    assert [g.split(":")[0] for g in got] == ["hybrid/extras/__init__.py", "hybrid/extras/tools.py",
                                              "hybrid/stray.py"], got


def test_the_checker_catches_planted_violations(tmp_path):
    def write(rel, text):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in ("hybrid", "hybrid/core", "hybrid/runtime", "hybrid/serve", "cpu_experts", "quant", "gpu_attn"):
        write(f"{pkg}/__init__.py", "")
    write("hybrid/runtime/engine.py", "def f():\n    from hybrid.serve.app import create_app\n")   # up, lazily
    write("hybrid/core/policies.py", "import torch\n")
    write("hybrid/serve/app.py", "from ..runtime import engine\nfrom hybrid.core import policies\n")  # both fine
    write("cpu_experts/moe.py", "import torch\n")
    write("quant/store.py", "from cpu_experts.moe import CpuMoE\n")
    write("gpu_attn/mla.py", "import numpy\nimport math\nimport torch\n")
    got = sorted(violations(tmp_path))
    assert [g.split(":")[0] for g in got] == ["cpu_experts/moe.py", "gpu_attn/mla.py", "hybrid/core/policies.py",
                                                "hybrid/runtime/engine.py", "quant/store.py"], got
    assert "runtime may not import the higher layer serve" in got[3]
