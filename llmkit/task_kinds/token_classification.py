"""Token classification (named entities): a BIO tag per word, each word tagged on its first sub-token.
Scored by entity-level precision, recall and F1."""

from __future__ import annotations

from llmkit.errors import LlmkitError
from llmkit.task_kinds.common import (IGNORE, Features, batches, predict, shifted_by_virtual_tokens,
                                      token_labels_collator)


def prepare_row(row: dict, settings, where: str) -> dict:
    """One tag per token (a list of tokens, or a string of one-character tokens)."""
    tokens, tags = row[settings.tokens_column], row[settings.tags_column]
    if not isinstance(tokens, (list, str)) or not isinstance(tags, list) or len(tokens) != len(tags):
        counts = f" ({len(tokens)} tokens, {len(tags)} tags)" if isinstance(tokens, (list, str)) and \
            isinstance(tags, list) else ""
        raise LlmkitError(f"{where}: expected a list '{settings.tags_column}' with one tag per token of "
                          f"'{settings.tokens_column}'{counts}")
    return row


def labels_of(settings, rows: list[dict]) -> list:
    return [tag for row in rows for tag in row[settings.tags_column]]


def label_order(settings, names: list[str]) -> list[str]:
    """Label names by id: the recipe's finetune.labels as given, else those seen in training, sorted, with
    "O" (outside any entity) first."""
    if settings.labels or "O" not in names:
        return names
    return ["O"] + [name for name in names if name != "O"]


def training_texts(settings, rows: list[dict]) -> list[str]:
    return ["".join(row[settings.tokens_column]) for row in rows]


def encode(settings, tokenizer, rows: list[dict], label2id: dict[str, int]) -> Features:
    """Each word's tag on its first sub-token; the other sub-tokens carry no loss."""
    words = [list(row[settings.tokens_column]) for row in rows]
    encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=settings.max_length)
    features, truncated = [], 0
    for index, row in enumerate(rows):
        labels, seen = [], set()
        for word in encoded.word_ids(index):
            labels.append(IGNORE if word is None or word in seen else label2id[str(row[settings.tags_column][word])])
            seen.add(word)
        truncated += len(seen - {None}) < len(words[index])
        features.append({"input_ids": encoded["input_ids"][index], "attention_mask": encoded["attention_mask"][index],
                         "labels": labels})
    return Features(features, truncated)


def collator(tokenizer, virtual_tokens: int = 0):
    return shifted_by_virtual_tokens(token_labels_collator(tokenizer), virtual_tokens, ignore_virtual_tokens)


def ignore_virtual_tokens(batch, virtual_tokens: int):
    """Labels for the virtual tokens in front: none."""
    import torch

    batch["labels"] = torch.nn.functional.pad(batch["labels"], (virtual_tokens, 0), value=IGNORE)
    return batch


def score(model, tokenizer, task, rows: list[dict], batch_size: int) -> dict:
    """Entity-level scores; each word takes the prediction of its first sub-token."""
    from llmkit.metrics import entity_metrics

    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    predicted, references = [], []
    for batch in batches(rows, batch_size):
        words = [list(row[task.tokens_column]) for row in batch]
        output, encoded = predict(model, tokenizer, words, is_split_into_words=True)
        logits = output.logits[:, -encoded["input_ids"].shape[1]:]  # prompt tuning puts virtual tokens first
        for index, row in enumerate(batch):
            tags = ["O"] * len(words[index])
            seen = set()
            for position, word in enumerate(encoded.word_ids(index)):
                if word is not None and word not in seen:
                    seen.add(word)
                    tags[word] = id2label[int(logits[index, position].argmax())]
            predicted.append(tags)
            references.append(list(row[task.tags_column]))
    return entity_metrics(predicted, references)
