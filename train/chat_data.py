"""Conversations in K2's chat template, made from the training text, so the model has seen
<|im_system|> ... <|im_user|> ... <|im_assistant|> ... <|im_end|> and answers after the generation prompt.

Four kinds, each a pure function of the documents and a seeded generator:
- "what does X do?"           -> the first paragraph of X's docstring (standard-library functions);
- "show me X"                 -> X's source in a python code block;
- "tell me a story" and kin   -> a passage of the bundled corpus;
- greetings ("Hello, who are you?", ...) -> one of a few short self-descriptions.
"""
from __future__ import annotations

import ast
import random
import textwrap
from dataclasses import dataclass

from train.corpus import Document

Message = dict[str, str]

GREETINGS = ("Hello, who are you?", "Hi!", "Hello!", "Who are you?", "What can you do?",
             "Hello, what is your name?", "Hey, are you there?", "Good morning!")
SELF_DESCRIPTIONS = (
    "Hello! I am a tiny model with the Kimi K2 architecture, trained for a few minutes on a CPU with "
    "MuonClip. I have read the Python standard library and a few short stories, so I can talk a little "
    "about Python code.",
    "Hi! I am a small language model of the K2 architecture. I was trained on Python's standard library "
    "and its documentation, so ask me about a Python function and I will try to explain it.",
    "I am a tiny K2-shaped assistant. I know some Python and a few stories about a lighthouse, bread and "
    "the sea. My answers are short and sometimes wrong.",
)
_ASK_DOC = ("What does `{name}` do?", "Explain `{name}`.", "What is `{name}` for?",
            "Can you describe the function `{name}`?")
_ASK_SRC = ("Show me the source of `{name}`.", "Write `{name}` in Python.", "How is `{name}` implemented?")
_ASK_STORY = ("Tell me a story.", "Tell me something interesting.", "Can you write a short passage?",
              "Continue this text: {start}")
_MAX_SOURCE_CHARS = 1200


@dataclass(frozen=True)
class Function:
    name: str          # module.function or module.Class.method
    doc: str           # first paragraph of the docstring
    source: str


def functions(code: list[Document]) -> list[Function]:
    """Documented top-level functions and methods of stdlib modules whose source fits a short answer."""
    out = []
    for d in code:
        module = d.name.removeprefix("stdlib/").removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        try:
            tree = ast.parse(d.text)
        except (SyntaxError, ValueError):
            continue
        lines = d.text.splitlines()
        for node, qual in _defs(tree):
            doc = ast.get_docstring(node)
            # whole lines, dedented (ast.get_source_segment re-splits the file on every call: 40 s here)
            src = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
            if doc and len(src) <= _MAX_SOURCE_CHARS and not node.name.startswith("_"):
                out.append(Function(f"{module}.{qual}", doc.split("\n\n")[0].strip(), src))
    return out


def _defs(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.name
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield sub, f"{node.name}.{sub.name}"


def conversations(code: list[Document], prose: list[Document], n: int, seed: int) -> list[list[Message]]:
    """n conversations (system + user + assistant), drawn with random.Random(seed)."""
    rng = random.Random(seed)
    fns = functions(code)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.1 or not (fns or prose):
            q, a = rng.choice(GREETINGS), rng.choice(SELF_DESCRIPTIONS)
        elif fns and kind < 0.55:
            f = rng.choice(fns)
            q = rng.choice(_ASK_DOC).format(name=f.name)
            a = f"`{f.name}`: {f.doc}"
        elif fns and kind < 0.8:
            f = rng.choice(fns)
            q = rng.choice(_ASK_SRC).format(name=f.name)
            a = f"Here is `{f.name}`:\n```python\n{f.source}\n```"
        else:
            q, a = _story(rng, prose) if prose else (rng.choice(GREETINGS), rng.choice(SELF_DESCRIPTIONS))
        out.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return out


def _story(rng: random.Random, prose: list[Document]) -> tuple[str, str]:
    text = _passage(rng, rng.choice(prose).text)
    ask = rng.choice(_ASK_STORY)
    if "{start}" in ask:
        cut = text.find(". ", 40)
        if 0 < cut < len(text) - 40:
            return ask.format(start=text[: cut + 1]), text[cut + 2:]
        ask = _ASK_STORY[0]
    return ask, text


def _passage(rng: random.Random, text: str, limit: int = 1500) -> str:
    """Consecutive paragraphs of text, starting at a random one, up to about `limit` characters."""
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    i = rng.randrange(len(paras)) if paras else 0
    out = []
    while i < len(paras) and (not out or sum(map(len, out)) + len(paras[i]) <= limit):
        out.append(paras[i][: limit])
        i += 1
    return "\n\n".join(out)
