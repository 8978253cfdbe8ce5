"""Training text available offline on every machine: the standard library's own source and docs, and the
bundled corpus; or the text files of a folder the user names.

Each source is a list of Documents (name, text). Names are stable across machines with the same Python,
so the held-out split (by name hash) and the data fingerprint are reproducible.
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from hybrid.text.bpe import CORPUS

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
# Stdlib folders left out: tests and demos (unidiomatic fixtures), codec tables and generated data
# (walls of hex), IDLE and tkinter (GUI glue), the installed third-party packages.
_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "encodings", "site-packages",
              "tkinter", "lib2to3", "pydoc_data", "ensurepip", "__pycache__", "config-3.11-x86_64-linux-gnu"}
_SKIP_FILES = {"_pydecimal.py", "_sysconfigdata__linux_x86_64-linux-gnu.py", "this.py", "antigravity.py"}
_MAX_FILE_CHARS = 200_000


class DataError(ValueError):
    """The training data cannot be used (no text, unreadable files)."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_code() -> list[Document]:
    """The standard library's Python modules (K2 is a coding model; PSF license), sorted by path."""
    root = stdlib_dir()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name in _SKIP_FILES or rel.name.startswith("_sysconfig"):
            continue
        text = _read(path)
        if text and len(text) <= _MAX_FILE_CHARS:
            out.append(Document(f"stdlib/{rel.as_posix()}", text))
    return out


def stdlib_docs(code: list[Document]) -> list[Document]:
    """English documentation: the language and library reference topics that `help()` shows
    (pydoc_data.topics), plus every module, class and function docstring of `code`."""
    out = []
    try:
        from pydoc_data.topics import topics
    except ImportError:            # some distributions package the topics separately
        topics = {}
    out += [Document(f"pydoc/{k}", v) for k, v in sorted(topics.items())]
    for doc in code:
        text = "\n\n".join(docstrings(doc.text))
        if text:
            out.append(Document(f"docstrings/{doc.name}", text))
    return out


def docstrings(source: str) -> list[str]:
    """The module's docstring, then those of its classes and functions (ast.walk order) as "name: text";
    docstrings of 40 characters or fewer are left out."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    out.append(doc if isinstance(node, ast.Module) else f"{node.name}: {doc}")
    return out


def bundled_corpus() -> list[Document]:
    """hybrid/data/corpus.txt, one Document per blank-line-separated paragraph group of ~2 KB."""
    return [Document(f"corpus/{i}", t) for i, t in enumerate(_chunks(CORPUS.read_text(encoding="utf-8")))]


def folder_documents(folder: Path) -> list[Document]:
    """Every text file (TEXT_SUFFIXES) under folder, sorted by path.

    Raises DataError when the folder does not exist or holds no non-empty text file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; pass a folder of text files "
                        f"({', '.join(TEXT_SUFFIXES)})")
    docs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES):
        text = _read(path)
        if text and text.strip():
            docs.append(Document(f"{folder.name}/{path.relative_to(folder).as_posix()}", text))
    if not docs:
        raise DataError(f"data folder {folder} holds no text: no non-empty {', '.join(TEXT_SUFFIXES)} file "
                        "(UTF-8) under it; add text files or leave out --data to train on the standard "
                        "library and the bundled corpus")
    return docs


def fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _chunks(text: str, size: int = 2000) -> list[str]:
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    return out + ([cur] if cur else [])
