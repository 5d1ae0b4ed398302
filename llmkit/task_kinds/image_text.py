"""Pictures as prompts: captioning (`caption`: a picture -> its caption, after the prompt "描述这张图片：") and
visual questions (`vqa`: a picture and a question -> the answer), learnt by a vision-language model
(llmkit.vision) with the loss on the caption or answer only. Scored by greedy generation: exact match,
BLEU, chrF, and, where the references are llmkit.scenes captions or its questions, attribute accuracy:
colour, shape, count and position read back from the generated text. The text-only baseline writes the
likeliest training caption or answer for the prompt, without seeing the picture.

A row's picture is a file path (relative paths resolve against the data file's folder), a hub data set's
Image feature, or its {"bytes": ...} form in a Parquet file; the last two are stored once in the cache.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.scenes import CAPTION_PROMPT, attribute_checks, read_scene
from llmkit.task_kinds.common import IGNORE, Features, token_labels_collator

BASELINE = "baseline_"  # prefix of the text-only baseline's metrics beside the model's
ATTRIBUTES = ("colour", "shape", "count", "position")
MARGIN = 8  # generated tokens beyond the longest reference: room enough, no endless output from an untrained model


def kind_of(settings) -> str:
    """"caption" or "vqa", from fine-tuning settings (task) or an evaluation task (kind)."""
    return getattr(settings, "kind", None) or settings.task


def example(row: dict, settings) -> tuple[object, str, str]:
    """(picture, prompt, target) of a row."""
    if kind_of(settings) == "caption":
        return row[settings.image_column], CAPTION_PROMPT, row[settings.text_column]
    return row[settings.image_column], row[settings.question_column], row[settings.answer_column]


# ---------------------------------------------------------------- reading rows


def with_source(rows: list[dict], settings, source: str) -> list[dict]:
    """Every picture as a file path: relative ones against the data file's folder, in-memory ones stored."""
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    column = settings.image_column
    for row in rows:
        value = row.get(column)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            row[column] = str(folder / value)
        elif value is not None and not isinstance(value, str):
            row[column] = stored_image(value)
    return rows


def stored_image(value) -> str:
    """A hub Image (a PIL image) or its {"bytes": ...} form, written once to the cache under its content hash."""
    import io

    from llmkit.corpora import cache_root

    data = value.get("bytes") if isinstance(value, dict) else None
    if data is None:
        if not hasattr(value, "save"):
            return value  # neither: refused by check_row, which names the row
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    path = cache_root() / "images" / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(data)
        partial.replace(path)
    return str(path)


readable: set[str] = set()  # pictures checked already


def check_row(row: dict, settings, where: str) -> dict:
    from llmkit.vision import open_image

    image = row.get(settings.image_column)
    if not isinstance(image, str):
        raise LlmkitError(f"{where}: '{settings.image_column}' must name an image file, got {image!r}")
    if image not in readable:  # a picture asked about three times is read once
        open_image(image, where)
        readable.add(image)
    for column in columns(settings)[1:]:
        if not isinstance(row.get(column), str) or not row[column].strip():
            raise LlmkitError(f"{where}: {kind_of(settings)} needs text in '{column}'")
    return row


def columns(settings) -> list[str]:
    if kind_of(settings) == "caption":
        return [settings.image_column, settings.text_column]
    return [settings.image_column, settings.question_column, settings.answer_column]


def prepare_row(row: dict, settings, where: str) -> dict:
    return check_row(row, settings, where)


def check_rows(task, rows: list[dict], where: str) -> None:
    """`llmkit eval`: pictures found and readable, texts present, before any model loads."""
    with_source(rows, task, task.source)
    for number, row in enumerate(rows, 1):
        check_row(row, task, f"{task.source}: row {number}")


# ---------------------------------------------------------------- training


def prepare_tokenizer(tokenizer, settings) -> None:
    from llmkit.vision import add_image_token

    add_image_token(tokenizer)


def processing_class(recipe, tokenizer, source: str):
    """The processor training saves beside the model: the base model's (source), or one built from [vision]."""
    from llmkit.vision import build_processor, load_processor

    if not source:
        return build_processor(recipe.vision, tokenizer)
    processor = load_processor(source)
    processor.tokenizer = tokenizer
    return processor


def training_texts(settings, rows: list[dict]) -> list[str]:
    return [text for row in rows for text in example(row, settings)[1:]]


def encode(settings, processor, rows: list[dict], label2id: dict[str, int]) -> Features:
    """The picture's tokens and the prompt, then the target and the end token; loss on the target only.
    The picture stays a path until the collator reads it."""
    from llmkit.vision import prompt_ids

    tokenizer = processor.tokenizer
    features, truncated = [], 0
    for row in rows:
        image, prompt, target = example(row, settings)
        start = prompt_ids(processor, prompt)
        answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = start + answer, [IGNORE] * len(start) + answer
        truncated += len(ids) > settings.max_length
        if len(start) >= settings.max_length:
            continue  # nothing of the target would be left to learn
        ids, labels = ids[:settings.max_length], labels[:settings.max_length]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "image": image})
    return Features(features, truncated, len(rows) - len(features))


def collator(processor, virtual_tokens: int = 0):
    """Pads the texts (labels with IGNORE) and reads the pictures of the batch into pixel values."""
    from llmkit.vision import encoder_side, open_image, pixel_values

    pad = token_labels_collator(processor.tokenizer)
    side = encoder_side(processor)

    def collate(rows: list[dict]) -> dict:
        batch = pad([{k: v for k, v in row.items() if k != "image"} for row in rows])
        batch["pixel_values"] = pixel_values(processor, [open_image(row["image"], side=side) for row in rows])
        return batch

    return collate


# ---------------------------------------------------------------- scoring


def score(model, processor, task, rows: list[dict], batch_size: int) -> dict:
    """Greedy captions or answers against the references; beside them, for the built-in test splits, the
    text-only baseline of the built-in training split."""
    from llmkit.settings import GenerateSettings
    from llmkit.vision import describe

    images, prompts, references = zip(*(example(row, task) for row in rows)) if rows else ((), (), ())
    longest = max((len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references),
                  default=1)
    settings = GenerateSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=longest + MARGIN)
    generated = describe(model, processor, list(images), list(prompts), settings, batch_size=batch_size)
    metrics = measures(rows, generated, list(references), task)
    name, colon, split = task.source.partition(":")
    if colon and split != "train" and name in ("shapes-caption", "shapes-vqa"):
        from llmkit.data import load_rows

        metrics |= baseline(task, load_rows(name, []), rows)
    return metrics


def measures(rows: list[dict], generated: list[str], references: list[str], settings) -> dict:
    """Exact match, BLEU, chrF (llmkit.metrics) and the attribute accuracies where the data has them."""
    from llmkit.metrics import generation_metrics

    metrics = {k: v for k, v in generation_metrics(generated, references).items() if isinstance(v, float)}
    if kind_of(settings) == "caption":
        checks = caption_checks(generated, references)
    else:
        checks = answer_checks(rows, generated, references)
    for attribute, results in checks.items():
        metrics[f"{attribute}_accuracy"] = sum(results) / len(results)
    every = [result for results in checks.values() for result in results]
    if every:
        metrics["attribute_accuracy"] = sum(every) / len(every)
    return metrics


def caption_checks(generated: list[str], references: list[str]) -> dict[str, list[bool]]:
    """Per attribute, every fact of the references that are scene captions (llmkit.scenes), read back."""
    checks: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    for text, reference in zip(generated, references):
        if read_scene(reference)["count"]:
            for name, results in attribute_checks(text, reference).items():
                checks[name].extend(results)
    return {name: results for name, results in checks.items() if results}


def answer_checks(rows: list[dict], generated: list[str], references: list[str]) -> dict[str, list[bool]]:
    """Per attribute a question asks about (the rows' "attribute" field), whether the answer is exact."""
    checks: dict[str, list[bool]] = defaultdict(list)
    for row, text, reference in zip(rows, generated, references):
        if row.get("attribute") in ATTRIBUTES:
            checks[row["attribute"]].append(text.strip() == reference.strip())
    return dict(checks)


def baseline(settings, train: list[dict], test: list[dict]) -> dict:
    """The text-only baseline: for each prompt the likeliest training target (the commonest of all for a
    prompt never seen), without the picture; scored like the model, as baseline_<metric>."""
    by_prompt: dict[str, Counter] = defaultdict(Counter)
    for row in train:
        _, prompt, target = example(row, settings)
        by_prompt[prompt][target] += 1
    overall = sum(by_prompt.values(), Counter()).most_common(1)[0][0]
    prompts = [example(row, settings)[1] for row in test]
    guesses = [by_prompt[prompt].most_common(1)[0][0] if prompt in by_prompt else overall for prompt in prompts]
    metrics = measures(test, guesses, [example(row, settings)[2] for row in test], settings)
    return {f"{BASELINE}{name}": value for name, value in metrics.items()}


def table_cells(metrics: dict) -> list[tuple[str, object]]:
    """The model's scores, then the text-only baseline's, where there is one."""
    names = ["attribute_accuracy", *(f"{name}_accuracy" for name in ATTRIBUTES), "exact_match", "bleu", "chrf"]
    shown = [(name, metrics[name]) for name in names if name in metrics]
    return shown + [(f"{BASELINE}{name}", metrics[f"{BASELINE}{name}"]) for name in names
                    if f"{BASELINE}{name}" in metrics]
