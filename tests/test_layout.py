"""The package rules, checked on the source: which package and subpackage may import which.

    hybrid:      core < text < models < runtime < profile < plan < serve < cli  (lower never imports higher);
                 every subpackage of hybrid is in that list; core and text are torch-free, also through
                 what they import (the closure over the project's modules)
    cpu_experts: never torch, never hybrid or gpu_attn (numpy + Numba; it may use quant)
    quant:       nothing of the project (a leaf)
    gpu_attn:    torch and the standard library only
    train:       may import anything of the project; only bench and tests import train
Every import counts: one inside a function (a lazy import is still a dependency) and
`importlib.import_module("name")` / `__import__("name")` with a literal name; a dynamic import whose name is
not a literal is refused outside the package facade (hybrid/__init__.py), since no rule could check it.
Every top-level package of the repository is checked, also one added later.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "text", "models", "runtime", "profile", "plan", "serve", "cli")
PROJECT = ("hybrid", "cpu_experts", "gpu_attn", "quant", "train", "bench", "tests")
TORCH_FREE = ("hybrid.core", "hybrid.text")
MAY_IMPORT_TRAIN = ("train", "bench", "tests")
FACADE = "hybrid"          # hybrid/__init__.py: its lazy names are looked up in a table


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved; a dynamic import
    whose name is not a string literal is reported as the module name "<dynamic>"."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += _from_import(node, package)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            arg = node.args[0] if node.args else None
            literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            out.append((node.lineno, arg.value if literal else "<dynamic>"))
    return out


def _from_import(node: ast.ImportFrom, package: str) -> list[tuple[int, str]]:
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    if node.module is None or node.level:     # `from . import x` may import submodules
        return [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return [(node.lineno, target)]


def _is_dynamic_import(func: ast.expr) -> bool:
    """importlib.import_module(...), import_module(...) or __import__(...)."""
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def top_level_packages(root: Path) -> list[str]:
    """Every folder directly under root that holds Python files (hidden folders, build outputs and
    virtual environments aside): the packages the rules apply to, also ones added later."""
    skip = {"build", "dist", "runs"}
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and d.name.isidentifier() and not d.name.startswith(".") and d.name not in skip
                  and any(d.rglob("*.py")))


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    if parts[0] != "hybrid":
        return None
    if len(parts) == 1 or parts[1] in ("__main__",):
        return len(LAYERS)                 # the package facade sits above everything
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def violations(root: Path) -> list[str]:
    """Every broken rule under `root` (a folder holding the project's packages), as 'file:line: why'."""
    found = [f"hybrid/{name}: a subpackage that is not in the layer list ({', '.join(LAYERS)}): add it to "
             f"LAYERS at its place" for name in _unlisted_subpackages(root)]
    graph = {}
    for pkg in top_level_packages(root):
        for path in sorted((root / pkg).rglob("*.py")):
            src = module_name(path, root)
            graph[src] = imports_of(path, root)
            for line, target in graph[src]:
                why = _broken(src, target)
                if why:
                    found.append(f"{path.relative_to(root)}:{line}: {src} imports {target}: {why}")
    return found + _torch_by_the_back_door(graph)


def _unlisted_subpackages(root: Path) -> list[str]:
    hybrid = root / "hybrid"
    if not hybrid.is_dir():
        return []
    return sorted(d.name for d in hybrid.iterdir() if d.is_dir() and d.name not in LAYERS
                  and not d.name.startswith((".", "_")) and any(d.glob("*.py")))


def _torch_by_the_back_door(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Torch-free modules that reach torch through project modules they import (directly or further down)."""
    found = []
    for src in sorted(m for m in graph if m.startswith(TORCH_FREE)):
        path = _torch_path(src, graph)
        if path and len(path) > 2:          # a direct `import torch` is reported by _broken
            found.append(f"{src}: reaches torch through {' -> '.join(path[1:])}: hybrid.core and hybrid.text "
                         f"are torch-free")
    return found


def _torch_path(src: str, graph: dict[str, list[tuple[int, str]]]) -> list[str] | None:
    """The first import chain src -> ... -> torch over the project's modules (breadth first), or None.
    Importing a.b.c runs a/__init__ and a/b/__init__ too, so those count as imported."""
    seen, queue = {src}, [[src]]
    while queue:
        chain = queue.pop(0)
        for _, target in graph.get(chain[-1], ()):
            if target.split(".")[0] == "torch":
                return chain + ["torch"]
            parts = target.split(".")
            for k in range(1, len(parts) + 1):
                mod = ".".join(parts[:k])
                if mod in graph and mod not in seen:
                    seen.add(mod)
                    queue.append(chain + [mod])
    return None


def _broken(src: str, target: str) -> str | None:
    top, ttop = src.split(".")[0], target.split(".")[0]
    if target == "<dynamic>":
        return None if src == FACADE else "a dynamic import must name its module with a string literal"
    if ttop == "train" and top not in MAY_IMPORT_TRAIN:
        return f"only {' and '.join(MAY_IMPORT_TRAIN[1:])} import train"
    if top == "cpu_experts" and ttop in ("torch", "hybrid", "gpu_attn"):
        return "cpu_experts never imports torch, hybrid or gpu_attn"
    if top == "quant" and ttop in PROJECT and ttop != "quant":
        return "quant imports nothing of the project"
    if top == "gpu_attn" and ttop != "gpu_attn" and ttop not in sys.stdlib_module_names and ttop != "torch":
        return "gpu_attn imports only torch and the standard library"
    if ttop in ("bench", "tests") and top not in ("bench", "tests"):
        return "the library never imports bench or tests"
    if top == "hybrid" and ttop == "torch" and src.startswith(TORCH_FREE):
        return "hybrid.core and hybrid.text are torch-free"
    if top == "hybrid" and ttop == "hybrid":
        a, b = _layer(src), _layer(target)
        if b is None:
            return f"{target} is not in a layer ({', '.join(LAYERS)})"
        if a is not None and b > a:
            higher = LAYERS[b] if b < len(LAYERS) else "hybrid (the facade: import the module that defines it)"
            return f"{LAYERS[a]} may not import the higher layer {higher}"
    return None


def test_the_project_keeps_its_import_rules():
    assert violations(ROOT) == []


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
    got = violations(tmp_path)
    assert [g.split(":")[0] for g in got] == ["cpu_experts/moe.py", "gpu_attn/mla.py", "hybrid/core/policies.py",
                                                "hybrid/runtime/engine.py", "quant/store.py"], got
    assert "runtime may not import the higher layer serve" in got[3]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A small project tree under tmp_path: the packages the rules know, plus `files` (path -> source)."""
    for pkg in ("hybrid", "hybrid/core", "hybrid/runtime", "hybrid/serve", "hybrid/cli", "gpu_attn", "train"):
        p = tmp_path / pkg / "__init__.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    (tmp_path / "gpu_attn" / "mla.py").write_text("import torch\n")
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_a_clean_small_tree_passes(tmp_path):
    assert violations(_tree(tmp_path, {"hybrid/runtime/engine.py": "import gpu_attn.mla\n"})) == []


def test_torch_by_the_back_door_into_a_torch_free_layer_is_caught(tmp_path):
    got = violations(_tree(tmp_path, {"hybrid/core/config.py": "def f():\n    import gpu_attn.mla\n"}))
    assert len(got) == 1 and "hybrid.core.config: reaches torch through gpu_attn.mla -> torch" in got[0]


def test_importlib_strings_count_as_imports(tmp_path):
    got = violations(_tree(tmp_path, {
        "hybrid/runtime/engine.py": "import importlib\nimportlib.import_module('hybrid.serve')\n",
        "hybrid/runtime/loader.py": "m = __import__('hybrid.cli')\n",
        "hybrid/runtime/model.py": "import importlib\nname = 'hybrid.serve'\nimportlib.import_module(name)\n"}))
    assert [g.split(": ", 1)[1] for g in got] == [
        "hybrid.runtime.engine imports hybrid.serve: runtime may not import the higher layer serve",
        "hybrid.runtime.loader imports hybrid.cli: runtime may not import the higher layer cli",
        "hybrid.runtime.model imports <dynamic>: a dynamic import must name its module with a string literal"], got


def test_a_subpackage_missing_from_the_layer_list_is_caught(tmp_path):
    got = violations(_tree(tmp_path, {"hybrid/extras/__init__.py": "", "hybrid/extras/x.py": "import hybrid.cli\n"}))
    assert len(got) == 1 and got[0].startswith("hybrid/extras: a subpackage that is not in the layer list"), got


def test_any_top_level_package_importing_train_is_caught(tmp_path):
    got = violations(_tree(tmp_path, {"newtool/__init__.py": "", "newtool/run.py": "from train.loop import x\n",
                                      "bench/b.py": "import train\n", "tests/t.py": "import train\n"}))
    assert got == ["newtool/run.py:1: newtool.run imports train.loop: only bench and tests import train"], got


def test_the_real_tree_has_every_package_checked():
    assert set(top_level_packages(ROOT)) >= set(PROJECT)
