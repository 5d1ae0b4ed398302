"""What the task modules share: the features they make for training, and the batched forward pass of
the scorers of encoder tasks (classification, tagging, extractive QA)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.loading import model_positions

IGNORE = -100  # label of tokens that carry no loss (transformers' convention)
MAX_LENGTH = 1024  # longest input when the model does not say


@dataclass
class Features:
    rows: list[dict]  # model inputs and targets, one dict per example
    truncated: int  # examples cut to max_length
    dropped: int = 0  # examples left out (an answer cut off by truncation, nothing left to learn)


def padding_collator(tokenizer):
    """Pads inputs (and a classifier's labels stay one per example)."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def token_labels_collator(tokenizer):
    """Pads inputs, and labels with IGNORE, for tasks with a label per token."""
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)


def shifted_by_virtual_tokens(pad, virtual_tokens: int, shift):
    """With prompt tuning, the virtual tokens come first in the model's output, so per-token targets move
    right by as many positions (PEFT leaves them as they are): `shift(batch, virtual_tokens)` moves them
    after `pad` has made the batch."""
    if not virtual_tokens:
        return pad
    return lambda rows: shift(pad(rows), virtual_tokens)


def predict(model, tokenizer, texts, pairs=None, **options):
    """Model output for one batch, padded on the right (position 0 holds [CLS] in BERT-style models)."""
    import torch

    options = {"truncation": True, **options}
    encoded = tokenizer(texts, pairs, max_length=model_positions(model.config) or MAX_LENGTH, padding=True,
                        padding_side="right", return_tensors="pt", **options)
    inputs = {k: v.to(model.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        return model(**inputs), encoded


def batches(rows: list, size: int):
    for start in range(0, len(rows), size):
        yield rows[start:start + size]
