"""Held-out rules: which part of a data source is for training and which for validation, the same on
every run and machine.

Text corpora hold out their LAST fraction of characters (whole documents): a model pretrained on the
first part never saw it, and the built-in task data sets of People's Daily test on those same
paragraphs. Labelled rows hold out a seeded random fraction.
"""

from __future__ import annotations

import random


def count_chars(documents: list[str]) -> int:
    """Characters of the text, counting one separator (line break) per document."""
    return sum(len(doc) + 1 for doc in documents)


def split_documents(documents: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """Train = the first (1 - fraction) of the characters; validation = the rest, whole documents."""
    target = count_chars(documents) * (1 - validation_fraction)
    seen = 0
    for index, doc in enumerate(documents):
        seen += len(doc) + 1
        if seen >= target:
            return documents[: index + 1], documents[index + 1:]
    return documents, []


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random `fraction` of the rows (at least one) held out; both parts keep the rows' order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(rows) * fraction))
    held = set(order[:cut])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
