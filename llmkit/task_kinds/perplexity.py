"""Language modelling quality: sliding-window perplexity, and loss per character (comparable across
tokenizers)."""

from __future__ import annotations

import math

from llmkit.loading import model_positions
from llmkit.splits import count_chars

MAX_WINDOW = 1024  # perplexity window when the model allows longer


def score(model, tokenizer, task, rows: list[dict], batch_size: int) -> dict:
    """Sliding-window perplexity over the documents joined as in pretraining (each closed by </s>):
    every token is scored once, with up to `context_length - stride` tokens of context carried over."""
    import torch

    documents = [row[task.text_column] for row in rows]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [token for ids in tokenizer(documents)["input_ids"] for token in ids + eos]
    window = task.context_length or min(model_positions(model.config) or MAX_WINDOW, MAX_WINDOW)
    stride = min(task.stride or max(window // 2, 1), window)
    spans, scored_until = [], 0
    for begin in range(0, max(len(stream) - 1, 1), stride):
        end = min(begin + window, len(stream))
        spans.append((begin, end, end - max(scored_until, begin + 1)))  # tokens not scored before
        scored_until = end
        if end == len(stream):
            break
    total_nll, scored = 0.0, 0
    with torch.no_grad():
        for group in batches_of_equal_length(spans, batch_size):
            ids = torch.tensor([stream[b:e] for b, e, _ in group], device=model.device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            for row, (_, _, new) in zip(nll, group):
                total_nll += row[-new:].sum().item()
                scored += new
    chars = count_chars(documents)
    loss = total_nll / scored
    return {"loss": loss, "perplexity": math.exp(loss), "loss_per_char": total_nll / chars,
            "tokens": scored, "chars": chars, "window": window, "stride": stride}


def batches_of_equal_length(spans: list[tuple], size: int):
    group: list[tuple] = []
    for span in spans:
        if group and (len(group) == size or span[1] - span[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group
