"""Text generation against references: greedy continuations of the prompts, scored by BLEU, chrF and
ROUGE-L."""

from __future__ import annotations

from llmkit.generation import generate_batch
from llmkit.settings import GenerateSettings


def score(model, tokenizer, task, rows: list[dict], batch_size: int) -> dict:
    from llmkit.metrics import generation_metrics

    settings = GenerateSettings(greedy=True, max_new_tokens=task.max_new_tokens, repetition_penalty=1.0)
    outputs = generate_batch(model, tokenizer, [row[task.prompt_column] for row in rows], settings,
                             batch_size=batch_size)
    return generation_metrics([texts[0] for texts in outputs], [row[task.reference_column] for row in rows])
