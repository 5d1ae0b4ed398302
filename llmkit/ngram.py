"""The classic language model: characters counted in n-grams, with interpolated absolute discounting
(Ney, Essen and Kneser 1994). Every causal pretraining run reports one as its baseline, and
`model.arch = "ngram"` trains one on its own.

    P(c | h) = max(n(h c) - D_k, 0) / n(h)  +  D_k x N1+(h .) / n(h) x P(c | h minus its first symbol)

for a history h of k symbols seen in training (n(h) = how often it precedes a symbol, N1+(h .) = how many
different symbols follow it); an unseen history takes its shorter one's probability. The recursion ends
at the unigram (k = 0), interpolated with a uniform floor over the vocabulary: every training character,
the end-of-document symbol </s> and <unk>, which stands for every character unseen in training, so
that every held-out character has a finite loss. D_k, one per order, is n1 / (n1 + 2 n2) of that
order's n-grams seen once (n1) and twice (n2) unless given. Since 0 < D_k <= 1, the probabilities over
the vocabulary sum to 1 for every history.

Text is read as pretraining packs it (llmkit.data.pack_blocks): each document's characters, then </s>,
one stream across documents; a symbol's history is the up to `order - 1` symbols before it in that
stream. Counts are plain dicts keyed by strings in which each character stands for one symbol id.

    model = NgramModel.train(list(texts(splits.train)), order=4)  # llmkit.data.texts
    model.score(list(texts(splits.validation)))["loss_per_char"]
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from collections import Counter
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.splits import count_chars

END = "</s>"  # closes each document, as pretraining's packing does
UNKNOWN = "<unk>"  # any character not seen in training
FILE = "ngram.json.gz"  # a saved model in a run folder
FORMAT = "llmkit-ngram"


def code(symbol_id: int) -> str:
    """The character that stands for a symbol id in count keys (surrogates skipped: JSON keeps them)."""
    return chr(symbol_id if symbol_id < 0xD800 else symbol_id + 0x800)


def estimate_discount(counts: dict[str, int]) -> float:
    """n1 / (n1 + 2 n2), from the n-grams seen once and twice; 0.5 when none was seen once."""
    seen = Counter(counts.values())
    once, twice = seen[1], seen[2]
    return once / (once + 2 * twice) if once else 0.5


class NgramModel:
    """A character n-gram model of `order` symbols (history of order - 1), interpolated absolute discounting."""

    def __init__(self, order: int, vocabulary: list[str], counts: list[dict[str, int]], discounts: list[float],
                 tail: str):
        """counts[k]: how often each n-gram of k + 1 symbols occurs in the training stream; tail: the stream's
        last order - 1 symbols (in codes)."""
        if not 1 <= order == len(counts) == len(discounts):
            raise LlmkitError(f"an n-gram model of order {order} needs that many count tables and discounts")
        if any(not 0 < d <= 1 for d in discounts):
            raise LlmkitError(f"n-gram discounts must lie in (0, 1], got {discounts}")
        self.order, self.vocabulary, self.counts, self.discounts = order, vocabulary, counts, discounts
        self.tail = tail
        self.codes = {symbol: code(i) for i, symbol in enumerate(vocabulary)}
        self.uniform = 1 / len(vocabulary)
        self.size = sum(counts[0].values())  # symbols in the training stream
        # N1+(h .) per history of k symbols: how many different symbols follow it.
        self.followers = [Counter(key[:k] for key in table) for k, table in enumerate(counts)]

    def total(self, context: str) -> int:
        """n(h): how often the history is followed by a symbol = its count as a k-gram, less one if the
        stream ends with it."""
        k = len(context)
        if not k:
            return self.size
        return self.counts[k - 1].get(context, 0) - (context == self.tail[len(self.tail) - k:])

    @classmethod
    def train(cls, documents: list[str], order: int = 4, discount: float | None = None) -> "NgramModel":
        """Count every n-gram of 1..order symbols in the documents' stream; `discount`: one D for every
        order instead of the estimate."""
        chars = Counter()
        for doc in documents:
            chars.update(doc)
        vocabulary = [UNKNOWN, END, *sorted(chars)]
        codes = {symbol: code(i) for i, symbol in enumerate(vocabulary)}
        stream = encode(documents, codes)
        if discount is not None and not 0 < discount <= 1:
            raise LlmkitError(f"an n-gram discount must lie in (0, 1], got {discount}")
        counts = [Counter(stream[i: i + k + 1] for i in range(len(stream) - k)) for k in range(order)]
        discounts = [discount if discount is not None else estimate_discount(table) for table in counts]
        return cls(order, vocabulary, counts, discounts, stream[len(stream) - order + 1:] if order > 1 else "")

    # ------------------------------------------------------------ probabilities

    def coded_probability(self, symbol: str, history: str) -> float:
        """P(symbol | history), both in codes; only the last order - 1 symbols of the history count."""
        p = self.uniform
        for k in range(min(len(history), self.order - 1) + 1):
            context = history[len(history) - k:]
            total = self.total(context)
            if not total:  # unseen: every longer history is unseen too
                break
            d = self.discounts[k]
            p = (max(self.counts[k].get(context + symbol, 0) - d, 0) + d * self.followers[k][context] * p) / total
        return p

    def probability(self, symbol: str, history=()) -> float:
        """P(symbol | history): symbol a character, END or UNKNOWN (an unseen character counts as UNKNOWN);
        history a string of characters or a sequence of such symbols."""
        unknown = self.codes[UNKNOWN]
        return self.coded_probability(self.codes.get(symbol, unknown),
                                      "".join(self.codes.get(s, unknown) for s in history))

    def distribution(self, history=()) -> dict[str, float]:
        """P(. | history) over the whole vocabulary (it sums to 1)."""
        unknown = self.codes[UNKNOWN]
        coded = "".join(self.codes.get(s, unknown) for s in history)[max(len(history) - self.order + 1, 0):]
        return {symbol: self.coded_probability(c, coded) for symbol, c in self.codes.items()}

    def score(self, documents: list[str]) -> dict:
        """Held-out loss per character, with the Transformers' denominator (llmkit.splits.count_chars):
        the sum of -ln P over every symbol of the documents' stream (each character, unseen ones as <unk>,
        and each document's closing </s>; the first symbols with the shorter history the stream gives) divided
        by count_chars(documents), the characters plus one per document. That is as many symbols as are
        scored, so it is also the mean loss per symbol. A Transformer's eval_loss_per_char is its total
        token NLL on the same text over the same count (llmkit.training.LlmkitTrainer.log,
        llmkit.task_kinds.perplexity)."""
        unknown = self.codes[UNKNOWN]
        stream = encode(documents, self.codes)
        context = self.order - 1
        nll = 0.0
        for i, symbol in enumerate(stream):
            nll -= math.log(self.coded_probability(symbol, stream[max(i - context, 0): i]))
        chars = count_chars(documents)
        return {"loss_per_char": nll / chars if chars else float("nan"), "nll": nll, "chars": chars,
                "unknown": stream.count(unknown)}

    def sample(self, prompt: str, max_new: int, seed: int) -> str:
        """The prompt continued by up to `max_new` sampled characters (until </s>; <unk> is not drawn)."""
        rng = random.Random(seed)
        text = prompt
        for _ in range(max_new):
            choices = self.distribution(text)
            choices.pop(UNKNOWN)
            symbol = rng.choices(list(choices), weights=list(choices.values()))[0]
            if symbol == END:
                break
            text += symbol
        return text

    # ------------------------------------------------------------ files

    def save(self, path: Path) -> None:
        """gzip'd JSON (written whole or not at all): order, vocabulary (a symbol's id is its index),
        discounts, and per order the n-gram counts keyed by their symbols' codes (`code`)."""
        data = {"format": FORMAT, "version": 1, "order": self.order, "vocabulary": self.vocabulary,
                "discounts": self.discounts, "tail": self.tail, "counts": self.counts}
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                with gzip.GzipFile(fileobj=handle, mode="wb", compresslevel=6, mtime=0) as zipped:
                    zipped.write(json.dumps(data, ensure_ascii=True).encode("ascii"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> "NgramModel":
        path = Path(path)
        if path.is_dir():
            path = path / FILE
        try:
            with gzip.open(path, "rt", encoding="ascii") as handle:
                data = json.load(handle)
        except (OSError, ValueError, EOFError) as error:
            raise LlmkitError(f"{path}: not a readable n-gram model ({error})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LlmkitError(f"{path}: not an llmkit n-gram model")
        return cls(data["order"], data["vocabulary"], data["counts"], data["discounts"], data["tail"])


def encode(documents: list[str], codes: dict[str, str]) -> str:
    """The documents' stream in codes: each document's characters (unseen ones as <unk>), then </s>."""
    unknown, end = codes[UNKNOWN], codes[END]
    return "".join("".join(codes.get(c, unknown) for c in doc) + end for doc in documents)
