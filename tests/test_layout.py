"""The package rules, checked on the source: which package and subpackage may import which.

    hybrid:      core < text < models < runtime < profile < plan < serve < cli  (lower never imports higher)
    cpu_experts: never torch, never hybrid or gpu_attn (numpy + Numba; it may use quant)
    quant:       nothing of the project (a leaf)
    gpu_attn:    torch and the standard library only
    train:       may import anything of the project; nothing imports train
Every import counts, also one inside a function: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "text", "models", "runtime", "profile", "plan", "serve", "cli")
PROJECT = ("hybrid", "cpu_experts", "gpu_attn", "quant", "train", "bench", "tests")
TORCH_FREE = ("hybrid.core", "hybrid.text")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if node.module is None or node.level:     # `from . import x` may import submodules
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    if parts[0] != "hybrid":
        return None
    if len(parts) == 1 or parts[1] in ("__main__",):
        return len(LAYERS)                 # the package facade sits above everything
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def violations(root: Path) -> list[str]:
    """Every broken rule under `root` (a folder holding the project's packages), as 'file:line: why'."""
    found = []
    for pkg in ("hybrid", "cpu_experts", "gpu_attn", "quant", "train"):
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else ():
            src = module_name(path, root)
            for line, target in imports_of(path, root):
                why = _broken(src, target)
                if why:
                    found.append(f"{path.relative_to(root)}:{line}: {src} imports {target}: {why}")
    return found


def _broken(src: str, target: str) -> str | None:
    top, ttop = src.split(".")[0], target.split(".")[0]
    if ttop == "train" and top != "train":
        return "nothing imports train"
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
    assert [g.split(":")[0] for g in got] == ["hybrid/core/policies.py", "hybrid/runtime/engine.py",
                                                "cpu_experts/moe.py", "gpu_attn/mla.py", "quant/store.py"], got
    assert "runtime may not import the higher layer serve" in got[1]
