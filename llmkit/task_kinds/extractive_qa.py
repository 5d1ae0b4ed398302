"""Extractive question answering: the answer is a span of the context, predicted as its start and end
tokens. Scored by exact match and F1 (SQuAD-style, by characters for Chinese)."""

from __future__ import annotations

from llmkit.errors import LlmkitError
from llmkit.task_kinds.common import Features, batches, padding_collator, predict, shifted_by_virtual_tokens

MAX_ANSWER_TOKENS = 30  # longest answer span considered


def answer_texts(answers) -> list[str]:
    """The answer texts of a row: a string, a list, or {"text": [...], "answer_start": [...]}."""
    if isinstance(answers, dict):
        answers = answers.get("text", [])
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


def prepare_row(row: dict, settings, where: str) -> dict:
    """The row with its first answer as {"text": [answer], "answer_start": [offset]}; it must be in the context."""
    context, answers = row[settings.context_column], row[settings.answers_column]
    texts = answer_texts(answers)
    starts = answers.get("answer_start") if isinstance(answers, dict) else None
    if not texts or not texts[0]:
        raise LlmkitError(f"{where}: empty answer")
    start = int(starts[0]) if starts else context.find(texts[0])
    if start < 0 or context[start:start + len(texts[0])] != texts[0]:
        raise LlmkitError(f"{where}: the answer {texts[0]!r} is not in its context"
                          + (f" at answer_start {start}" if starts else ""))
    row[settings.answers_column] = {"text": texts, "answer_start": [start]}
    return row


def training_texts(settings, rows: list[dict]) -> list[str]:
    return [row[column] for row in rows for column in (settings.question_column, settings.context_column)]


def encode(settings, tokenizer, rows: list[dict], label2id: dict[str, int]) -> Features:
    """Start and end token of the answer inside the context; an answer cut off by truncation is dropped."""
    questions = [row[settings.question_column] for row in rows]
    contexts = [row[settings.context_column] for row in rows]
    encoded = tokenizer(questions, contexts, truncation="only_second", max_length=settings.max_length,
                        return_offsets_mapping=True)
    features, truncated, dropped = [], 0, 0
    for index, row in enumerate(rows):
        answer = row[settings.answers_column]
        first = answer["answer_start"][0]
        last = first + len(answer["text"][0])
        in_context = [i for i, s in enumerate(encoded.sequence_ids(index)) if s == 1]
        offsets = encoded["offset_mapping"][index]
        truncated += not in_context or offsets[in_context[-1]][1] < len(contexts[index])
        starts = [i for i in in_context if offsets[i][0] <= first < offsets[i][1]]
        ends = [i for i in in_context if offsets[i][0] < last <= offsets[i][1]]
        if not starts or not ends:
            dropped += 1
            continue
        features.append({"input_ids": encoded["input_ids"][index], "attention_mask": encoded["attention_mask"][index],
                         "start_positions": starts[0], "end_positions": ends[0]})
    return Features(features, truncated, dropped)


def collator(tokenizer, virtual_tokens: int = 0):
    return shifted_by_virtual_tokens(padding_collator(tokenizer), virtual_tokens, move_answer)


def move_answer(batch, virtual_tokens: int):
    """The answer's start and end, past the virtual tokens in front."""
    batch["start_positions"] += virtual_tokens
    batch["end_positions"] += virtual_tokens
    return batch


def score(model, tokenizer, task, rows: list[dict], batch_size: int) -> dict:
    """The best-scoring span (start <= end, at most MAX_ANSWER_TOKENS) inside the context."""
    from llmkit.metrics import squad_metrics

    predictions = []
    for batch in batches(rows, batch_size):
        questions, contexts = [r[task.question_column] for r in batch], [r[task.context_column] for r in batch]
        output, encoded = predict(model, tokenizer, questions, contexts, truncation="only_second",
                                  return_offsets_mapping=True)
        for index, context in enumerate(contexts):
            in_context = [i for i, s in enumerate(encoded.sequence_ids(index)) if s == 1]
            length = encoded["input_ids"].shape[1]  # prompt tuning puts virtual tokens first
            starts, ends = output.start_logits[index, -length:], output.end_logits[index, -length:]
            best = max(((s, e) for s in in_context for e in in_context if s <= e < s + MAX_ANSWER_TOKENS),
                       key=lambda span: float(starts[span[0]] + ends[span[1]]), default=None)
            offsets = encoded["offset_mapping"][index]
            predictions.append(context[int(offsets[best[0]][0]):int(offsets[best[1]][1])] if best else "")
    return squad_metrics(predictions, [answer_texts(r[task.answers_column]) for r in rows])
