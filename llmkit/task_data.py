"""Fine-tuning data: read and check the rows of a task, map labels to ids, and turn rows into model
features (input ids plus the task's labels) with a matching collator.

Every check runs before a model loads or the disk is touched, and names the source and row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from llmkit.data import load_rows
from llmkit.errors import LlmkitError
from llmkit.settings import EvalTask, FinetuneSettings

EVAL_KIND = {  # how `llmkit eval` scores each fine-tuning task
    "classification": "classification",
    "token-classification": "token-classification",
    "extractive-qa": "extractive-qa",
    "causal-lm": "generation",
}
IGNORE = -100  # label of tokens that carry no loss


@dataclass
class TaskData:
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: list[str] = field(default_factory=list)  # classification / tagging: label names by id

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.labels)}


def eval_task(settings: FinetuneSettings, source: str) -> EvalTask:
    """The `llmkit eval` task that scores rows of this fine-tuning data (same columns)."""
    columns = {name: getattr(settings, name) for name in EvalTask.__dataclass_fields__ if name.endswith("_column")}
    columns["reference_column"] = settings.response_column
    return EvalTask(kind=EVAL_KIND[settings.task], source=source, split="all", **columns)


def load_task_data(settings: FinetuneSettings, seed: int) -> TaskData:
    """Train / validation / test rows, checked; validation is a seeded hold-out unless given."""
    train = read_rows(settings, settings.source, settings.hub_split)
    if settings.validation_source:
        validation = read_rows(settings, settings.validation_source, "validation")
    else:
        train, validation = hold_out(train, settings.validation_fraction, seed)
    test = read_rows(settings, settings.test_source, "test") if settings.test_source else []
    if not train or not validation:
        raise LlmkitError(f"finetune.source {settings.source}: too few rows ({len(train)}) to hold out a validation split")
    data = TaskData(train, validation, test)
    if settings.task in ("classification", "token-classification"):
        data.labels = label_names(settings, data)
    return data


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(rows) * fraction))
    held = set(order[:cut])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def read_rows(settings: FinetuneSettings, source: str, hub_split: str) -> list[dict]:
    if settings.task == "causal-lm":
        rows = load_rows(source, [], hub_split=hub_split, text_columns=0)
        return [chat_messages(row, settings, f"{source}: row {n}") for n, row in enumerate(rows, 1)]
    from llmkit.evaluate import task_columns

    columns, text_columns = task_columns(eval_task(settings, source))
    rows = load_rows(source, columns, hub_split=hub_split, text_columns=text_columns)
    if settings.task == "extractive-qa":
        for number, row in enumerate(rows, 1):
            row[settings.answers_column] = answer_span(row, settings, f"{source}: row {number}")
    if settings.task == "token-classification":
        for number, row in enumerate(rows, 1):
            check_tags(row, settings, f"{source}: row {number}")
    return rows


def check_tags(row: dict, settings: FinetuneSettings, where: str) -> None:
    """One tag per token (a list of tokens, or a string of one-character tokens)."""
    tokens, tags = row[settings.tokens_column], row[settings.tags_column]
    if not isinstance(tokens, (list, str)) or not isinstance(tags, list) or len(tokens) != len(tags):
        counts = f" ({len(tokens)} tokens, {len(tags)} tags)" if isinstance(tokens, (list, str)) and \
            isinstance(tags, list) else ""
        raise LlmkitError(f"{where}: expected a list '{settings.tags_column}' with one tag per token of "
                          f"'{settings.tokens_column}'{counts}")


def chat_messages(row: dict, settings: FinetuneSettings, where: str) -> dict:
    """A causal-lm row as {"messages": [...]}: chat rows as they are, prompt/response rows as one turn."""
    messages = row.get(settings.messages_column)
    if messages is None:
        prompt, response = row.get(settings.prompt_column), row.get(settings.response_column)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise LlmkitError(f"{where}: expected text fields '{settings.prompt_column}' and "
                              f"'{settings.response_column}', or a '{settings.messages_column}' list")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and m.get("role") for m in messages):
        raise LlmkitError(f"{where}: '{settings.messages_column}' must be a list of {{role, content}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise LlmkitError(f"{where}: no assistant message to learn")
    return {"messages": messages}


def answer_span(row: dict, settings: FinetuneSettings, where: str) -> dict:
    """{"text": answer, "answer_start": offset} of the first answer; it must be in the context."""
    from llmkit.evaluate import answer_texts

    context, answers = row[settings.context_column], row[settings.answers_column]
    texts = answer_texts(answers)
    starts = answers.get("answer_start") if isinstance(answers, dict) else None
    if not texts or not texts[0]:
        raise LlmkitError(f"{where}: empty answer")
    start = int(starts[0]) if starts else context.find(texts[0])
    if start < 0 or context[start:start + len(texts[0])] != texts[0]:
        raise LlmkitError(f"{where}: the answer {texts[0]!r} is not in its context"
                          + (f" at answer_start {start}" if starts else ""))
    return {"text": texts, "answer_start": [start]}


def label_names(settings: FinetuneSettings, data: TaskData) -> list[str]:
    """Label names by id: the recipe's order, else sorted ("O" first for tags). Every validation and
    test label must be known from training."""
    if settings.task == "classification":
        def labels_of(rows):
            return [row[settings.label_column] for row in rows]
    else:
        def labels_of(rows):
            return [tag for row in rows for tag in row[settings.tags_column]]
    seen = labels_of(data.train)
    kinds = {type(label).__name__ for label in seen}
    if len(kinds) > 1 or not kinds <= {"str", "int"}:
        raise LlmkitError(f"finetune.source {settings.source}: labels must be all text or all integers, "
                          f"found {', '.join(sorted(kinds))}")
    names = settings.labels or [str(label) for label in sorted(set(seen))]
    if settings.task == "token-classification" and "O" in names and not settings.labels:
        names = ["O"] + [name for name in names if name != "O"]
    for split, rows, source in (("training", data.train, settings.source),
                                ("validation", data.validation, settings.validation_source or settings.source),
                                ("test", data.test, settings.test_source)):
        unknown = sorted({str(label) for label in labels_of(rows)} - set(names))
        if unknown:
            where = "is not in finetune.labels" if settings.labels else "never appears in the training data"
            raise LlmkitError(f"{source} ({split} split): label {unknown[0]!r} {where}")
    if len(names) < 2 and settings.task == "classification":
        raise LlmkitError(f"finetune.source {settings.source}: classification needs at least 2 labels, found {names}")
    return names


# ---------------------------------------------------------------- features


@dataclass
class Features:
    rows: list[dict]  # model inputs and labels, one dict per example
    truncated: int  # examples cut to max_length
    dropped: int = 0  # examples left out (an answer cut off by truncation)


def encode(settings: FinetuneSettings, tokenizer, rows: list[dict], labels: list[str]) -> Features:
    encoders = {"classification": encode_classification, "token-classification": encode_tagging,
                "extractive-qa": encode_qa, "causal-lm": encode_chat}
    return encoders[settings.task](settings, tokenizer, rows, {name: i for i, name in enumerate(labels)})


def encode_classification(settings, tokenizer, rows, label2id) -> Features:
    texts = [row[settings.text_column] for row in rows]
    pairs = [row[settings.text_pair_column] for row in rows] if settings.text_pair_column else None
    full = tokenizer(texts, pairs)["input_ids"]
    encoded = tokenizer(texts, pairs, truncation=True, max_length=settings.max_length)
    features = [{"input_ids": ids, "attention_mask": mask, "labels": label2id[str(row[settings.label_column])]}
                for ids, mask, row in zip(encoded["input_ids"], encoded["attention_mask"], rows)]
    return Features(features, sum(len(ids) > settings.max_length for ids in full))


def encode_tagging(settings, tokenizer, rows, label2id) -> Features:
    """Each word's tag on its first sub-token; the other sub-tokens carry no loss."""
    words = [list(row[settings.tokens_column]) for row in rows]
    encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=settings.max_length)
    features, truncated = [], 0
    for index, row in enumerate(rows):
        word_ids = encoded.word_ids(index)
        labels, seen = [], set()
        for word in word_ids:
            labels.append(IGNORE if word is None or word in seen else label2id[str(row[settings.tags_column][word])])
            seen.add(word)
        truncated += len(seen - {None}) < len(words[index])
        features.append({"input_ids": encoded["input_ids"][index], "attention_mask": encoded["attention_mask"][index],
                         "labels": labels})
    return Features(features, truncated)


def encode_qa(settings, tokenizer, rows, label2id) -> Features:
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


def encode_chat(settings, tokenizer, rows, label2id) -> Features:
    """The chat template over each conversation; loss only on the assistant's tokens."""
    features, truncated = [], 0
    for row in rows:
        messages = row["messages"]
        ids = render(tokenizer, messages)
        labels = [IGNORE] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] == "assistant":
                begin = len(render(tokenizer, messages[:turn], generation_prompt=True))
                end = len(render(tokenizer, messages[:turn + 1]))
                labels[begin:end] = ids[begin:end]
        truncated += len(ids) > settings.max_length
        ids, labels = ids[:settings.max_length], labels[:settings.max_length]
        if any(label != IGNORE for label in labels):
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Features(features, truncated, len(rows) - len(features))


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation; the tokenizer adds its special tokens unless the template did."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=not starts_with_bos(tokenizer, text))["input_ids"]


def starts_with_bos(tokenizer, text: str) -> bool:
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


def collator(task: str, tokenizer, virtual_tokens: int = 0):
    """Pads a batch. With prompt tuning, `virtual_tokens` come first in the model's output, so the
    targets of taggers and QA move right by as many positions (PEFT leaves them as they are)."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if task in ("token-classification", "causal-lm"):  # labels padded with IGNORE like the inputs
        pad = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)
    else:
        pad = DataCollatorWithPadding(tokenizer)
    if not virtual_tokens or task not in ("token-classification", "extractive-qa"):
        return pad

    def shifted(rows):
        import torch

        batch = pad(rows)
        if task == "token-classification":
            batch["labels"] = torch.nn.functional.pad(batch["labels"], (virtual_tokens, 0), value=IGNORE)
        else:
            batch["start_positions"] += virtual_tokens
            batch["end_positions"] += virtual_tokens
        return batch

    return shifted


def generation_rows(settings: FinetuneSettings, tokenizer, rows: list[dict]) -> tuple[EvalTask, list[dict]]:
    """Causal-lm test rows as `llmkit eval` generation rows: the templated prompt up to the last
    assistant turn, and that turn as the reference."""
    task = replace(eval_task(settings, settings.test_source), prompt_column="prompt", reference_column="reference")
    scored = []
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        if starts_with_bos(tokenizer, prompt):  # generation adds the tokenizer's special tokens itself
            prompt = prompt[len(tokenizer.bos_token):]
        scored.append({"prompt": prompt, "reference": messages[last]["content"]})
    return task, scored
