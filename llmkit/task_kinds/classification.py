"""Text (or text-pair) classification: a label per example, read from the model's [CLS]/last position.
Scored by accuracy and macro precision, recall and F1."""

from __future__ import annotations

from llmkit.errors import LlmkitError
from llmkit.task_kinds.common import Features, batches, padding_collator, predict


def prepare_row(row: dict, settings, where: str) -> dict:
    return row


def labels_of(settings, rows: list[dict]) -> list:
    return [row[settings.label_column] for row in rows]


def label_order(settings, names: list[str]) -> list[str]:
    """Label names by id: the recipe's finetune.labels, else those seen in training, sorted."""
    if len(names) < 2:
        raise LlmkitError(f"finetune.source {settings.source}: classification needs at least 2 labels, found {names}")
    return names


def training_texts(settings, rows: list[dict]) -> list[str]:
    columns = [column for column in (settings.text_column, settings.text_pair_column) if column]
    return [row[column] for row in rows for column in columns]


def encode(settings, tokenizer, rows: list[dict], label2id: dict[str, int]) -> Features:
    texts = [row[settings.text_column] for row in rows]
    pairs = [row[settings.text_pair_column] for row in rows] if settings.text_pair_column else None
    full = tokenizer(texts, pairs)["input_ids"]
    encoded = tokenizer(texts, pairs, truncation=True, max_length=settings.max_length)
    features = [{"input_ids": ids, "attention_mask": mask, "labels": label2id[str(row[settings.label_column])]}
                for ids, mask, row in zip(encoded["input_ids"], encoded["attention_mask"], rows)]
    return Features(features, sum(len(ids) > settings.max_length for ids in full))


def collator(tokenizer, virtual_tokens: int = 0):
    return padding_collator(tokenizer)  # one label per example: virtual tokens move nothing


def loss_weights(settings, rows: list[dict], label2id: dict[str, int]):
    """finetune.class_weights = "balanced": each class weighs total / (classes x its count), as in scikit-learn."""
    if settings.class_weights == "none":
        return None
    import torch

    counts = [0] * len(label2id)
    for row in rows:
        counts[label2id[str(row[settings.label_column])]] += 1
    return torch.tensor([len(rows) / (len(counts) * max(count, 1)) for count in counts])


def score(model, tokenizer, task, rows: list[dict], batch_size: int) -> dict:
    from llmkit.metrics import classification_metrics

    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    references = [label_name(row[task.label_column], id2label) for row in rows]
    unknown = sorted(set(references) - set(id2label.values()))
    if unknown:
        raise LlmkitError(f"{task.source}: label {unknown[0]!r} is not one of the model's labels "
                          f"{sorted(id2label.values())}")
    predictions = []
    for batch in batches(rows, batch_size):
        pairs = [row[task.text_pair_column] for row in batch] if task.text_pair_column else None
        output, _ = predict(model, tokenizer, [row[task.text_column] for row in batch], pairs)
        predictions += [id2label[i] for i in output.logits.argmax(-1).tolist()]
    return classification_metrics(predictions, references, labels=list(id2label.values()))


def label_name(label, id2label: dict[int, str]) -> str:
    """A gold label as the model names it: ids map through id2label, names stay."""
    if isinstance(label, int) and not isinstance(label, bool) and label in id2label:
        return id2label[label]
    return str(label)
