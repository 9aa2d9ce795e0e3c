"""The examples of docs/integrations.md, by name, so that tests run exactly what the doc shows.

An example is the fenced code block that follows a ``<!-- example: NAME -->`` line.
"""

from __future__ import annotations

import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "integrations.md")

_BLOCK = re.compile(r"<!-- example: ([\w-]+) -->\s*\n```[\w]*\n(.*?)\n```", re.S)


def examples(path: str = DOC) -> dict:
    with open(path) as f:
        text = f.read()
    found = {}
    for name, code in _BLOCK.findall(text):
        if name in found:
            raise ValueError(f"{path}: example {name!r} appears twice")
        found[name] = code
    return found


def example(name: str) -> str:
    ex = examples()
    if name not in ex:
        raise KeyError(f"docs/integrations.md has no example {name!r} (has {sorted(ex)})")
    return ex[name]


def command_args(name: str, after: str) -> list:
    """The arguments of a shell example after the word ``after`` (backslash continuations and
    ``#`` comments removed)."""
    lines = [ln.split(" #")[0] for ln in example(name).splitlines() if not ln.lstrip().startswith("#")]
    words = shlex.split(" ".join(ln.rstrip().rstrip("\\") for ln in lines))
    return words[words.index(after) + 1:]
