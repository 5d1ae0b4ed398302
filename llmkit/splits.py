"""Held-out rules: which part of a data source is for training and which for validation, the same on
every run and machine.

Text corpora hold out their LAST fraction of characters (whole documents): a model pretrained on the
first part never saw it, and the built-in task data sets of People's Daily test on those same
paragraphs. Labelled rows hold out a seeded random fraction.
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence


def count_chars(documents: list[str]) -> int:
    """Characters of the text, counting one separator (line break) per document."""
    return sum(len(doc) + 1 for doc in documents)


def split_documents(documents: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """Train = the first (1 - fraction) of the characters; validation = the rest, whole documents."""
    cut = held_out_start([[len(doc) + 1 for doc in documents]], count_chars(documents), validation_fraction)
    return documents[:cut], documents[cut:]


def held_out_start(lengths: Iterable[Sequence[int]], total: int, validation_fraction: float) -> int:
    """Where validation starts: after the first document whose end reaches (1 - fraction) of the `total`
    characters. `lengths`: each document's characters plus one (count_chars), in order, in batches (a corpus
    too big for memory is counted a batch at a time)."""
    import numpy as np

    target = total * (1 - validation_fraction)
    seen = start = 0
    for batch in lengths:
        ends = seen + np.cumsum(batch, dtype=np.int64)
        reached = int(np.searchsorted(ends, target))  # the first end >= target
        if reached < len(ends):
            return start + reached + 1
        seen, start = (int(ends[-1]) if len(ends) else seen), start + len(ends)
    return start


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random `fraction` of the rows (at least one) held out; both parts keep the rows' order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(rows) * fraction))
    held = set(order[:cut])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
