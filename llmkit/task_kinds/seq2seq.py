"""Sequence to sequence with an encoder-decoder (T5, BART): the source text (prompt_column) is read by
the encoder, the target (response_column) is learned by the decoder, which attends to the encoder's
states; translation is the classic case (llmkit's built-in one: Chinese -> pinyin). Scored by greedy
generation from each source: exact match per sentence, BLEU and chrF. `baseline` is a per-character
dictionary, for targets that spell each source character as one space-separated item (pinyin)."""

from __future__ import annotations

from collections import Counter, defaultdict

from llmkit.errors import LlmkitError
from llmkit.task_kinds.common import IGNORE, Features

BASELINE = "baseline_"  # prefix of the baseline's metrics beside the model's


def prepare_row(row: dict, settings, where: str) -> dict:
    for column in (settings.prompt_column, settings.response_column):
        if not isinstance(row.get(column), str) or not row[column].strip():
            raise LlmkitError(f"{where}: seq2seq needs text in '{column}'")
    return row


def training_texts(settings, rows: list[dict]) -> list[str]:
    """A tokenizer trained here reads sources and targets alike (one vocabulary, shared embeddings)."""
    return [row[column] for row in rows for column in (settings.prompt_column, settings.response_column)]


def encode(settings, tokenizer, rows: list[dict], label2id: dict[str, int]) -> Features:
    """Source ids as input_ids, target ids as labels (each with the tokenizer's end token); the model
    makes the decoder's inputs from the labels (shifted right after its decoder start token)."""
    sources = tokenizer([row[settings.prompt_column] for row in rows])["input_ids"]
    targets = tokenizer(text_target=[row[settings.response_column] for row in rows])["input_ids"]
    limit = settings.max_length
    features = [{"input_ids": source[:limit], "attention_mask": [1] * len(source[:limit]), "labels": target[:limit]}
                for source, target in zip(sources, targets)]
    truncated = sum(len(source) > limit or len(target) > limit for source, target in zip(sources, targets))
    return Features(features, truncated)


def collator(tokenizer, virtual_tokens: int = 0):
    """Pads inputs with the pad token and labels with IGNORE (no loss on padding)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)


def predictions(model, tokenizer, sources: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    from llmkit.generation import generate_batch
    from llmkit.settings import GenerateSettings

    settings = GenerateSettings(greedy=True, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
    return [texts[0] for texts in generate_batch(model, tokenizer, sources, settings, batch_size=batch_size)]


def score(model, tokenizer, task, rows: list[dict], batch_size: int) -> dict:
    """Greedy translations of the sources against the targets."""
    from llmkit.metrics import generation_metrics

    sources = [row[task.prompt_column] for row in rows]
    references = [row[task.response_column] for row in rows]
    longest = max((len(tokenizer(text_target=text)["input_ids"]) for text in references), default=1)
    # up to the longest target and a margin: enough room, and no endless output from an untrained model
    return generation_metrics(predictions(model, tokenizer, sources, max(task.max_new_tokens, longest + 8),
                                          batch_size), references)


def baseline(settings, train: list[dict], test: list[dict]) -> dict:
    """The per-character dictionary: each source character becomes its most frequent target item in the
    training rows whose target has one space-separated item per source character, or stays as it is
    where it has none; scored like the model, as baseline_<metric>."""
    from llmkit.metrics import generation_metrics

    table = character_dictionary(settings, train)
    guesses = [" ".join(table.get(char, char) for char in row[settings.prompt_column]) for row in test]
    metrics = generation_metrics(guesses, [row[settings.response_column] for row in test])
    return {f"{BASELINE}{name}": value for name, value in metrics.items() if isinstance(value, float)}


def character_dictionary(settings, rows: list[dict]) -> dict[str, str]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        source, items = row[settings.prompt_column], row[settings.response_column].split()
        if len(source) == len(items):
            for char, item in zip(source, items):
                counts[char][item] += 1
    return {char: counter.most_common(1)[0][0] for char, counter in counts.items()}
