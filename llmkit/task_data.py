"""A task's rows and the code that handles them: rows read from any source, checked (naming the source
and row), split and labelled; features and batches for training; scores of a model.

Fine-tuning reads a training source and holds out validation rows (seeded) unless given; `llmkit eval`
and `llmkit quantize` read the rows they score. What differs between tasks comes from the task table
(llmkit.tasks) and the task's module (llmkit/task_kinds/, named by its entry). Every check runs before a
model loads or the disk is touched.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from llmkit import tasks
from llmkit.corpora import BUILTIN_CORPORA
from llmkit.data import load_rows
from llmkit.errors import LlmkitError
from llmkit.settings import EvalTask, FinetuneSettings
from llmkit.splits import hold_out, split_documents


@dataclass
class TaskData:
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: list[str] = field(default_factory=list)  # classification / tagging: label names by id

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.labels)}


def implementation(name: str):
    """The module that implements a task (llmkit/task_kinds/<module>.py)."""
    return importlib.import_module(f"llmkit.task_kinds.{tasks.TASKS[name].module}")


def score(model, tokenizer, task: EvalTask, rows: list[dict], batch_size: int) -> dict:
    """Score a model on the rows of an evaluation task with its kind's scorer."""
    return implementation(task.kind).score(model, tokenizer, task, rows, batch_size)


def task_name(task: EvalTask) -> str:
    """An evaluation task's row label in results: its name, else kind and source."""
    return task.name or f"{task.kind}:{Path(task.source).name}"


def task_rows(task: EvalTask, limit: int = 0, where: str = "eval.tasks[]") -> list[dict]:
    """The rows an evaluation task scores: for a built-in corpus, its held-out last fraction; a file is
    scored whole. `limit`: the first N only (0 = all). A task module's `check_rows(task, rows, where)` sees
    all of them first (errors name the settings by `where`, e.g. eval.tasks[0])."""
    columns, text_columns = tasks.columns_of(task.kind, task)
    rows = load_rows(task.source, columns, hub_split=task.hub_split, text_columns=text_columns)
    if task.split == "validation" and task.source in BUILTIN_CORPORA and task.kind == "perplexity":
        documents = split_documents([row[task.text_column] for row in rows], task.validation_fraction)[1]
        rows = [{task.text_column: doc} for doc in documents]
    check = getattr(implementation(task.kind), "check_rows", None)
    if check:
        check(task, rows, where)
    return rows[:limit] if limit else rows


def table_cells(kind: str, metrics: dict) -> list[tuple[str, object]]:
    """What a result shows in the tables of `llmkit eval`: (row label, value) pairs, from its task module's
    `table_cells(metrics)`, else the task's headline metrics. A value is a number, text, true/false, or
    (number, [low, high]): a figure with its 95% confidence interval (a metric `m` with `m_ci95` beside it)."""
    cells = getattr(implementation(kind), "table_cells", None)
    if cells:
        return cells(metrics)
    return [(name, (metrics[name], metrics[f"{name}_ci95"]) if f"{name}_ci95" in metrics else metrics.get(name))
            for name in tasks.TASKS[kind].headline]


def eval_task(settings: FinetuneSettings, source: str) -> EvalTask:
    """The `llmkit eval` task that scores rows of this fine-tuning data (same columns)."""
    columns = {name: getattr(settings, name) for name in EvalTask.__dataclass_fields__ if name.endswith("_column")}
    columns["reference_column"] = settings.response_column
    return EvalTask(kind=tasks.scorer_of(settings.task), source=source, split="all", **columns)


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
    if tasks.TASKS[settings.task].has_labels:
        data.labels = label_names(settings, data)
    return data


def read_rows(settings: FinetuneSettings, source: str, hub_split: str) -> list[dict]:
    """A source's rows, each checked (and put in the task's shape) by the task's module."""
    columns, text_columns = tasks.columns_of(settings.task, settings)
    rows = load_rows(source, columns, hub_split=hub_split, text_columns=text_columns)
    task = implementation(settings.task)
    with_source = getattr(task, "with_source", None)
    if with_source:  # rows that name files (pictures): relative names resolve against the data's folder
        rows = with_source(rows, settings, source)
    return [task.prepare_row(row, settings, f"{source}: row {number}") for number, row in enumerate(rows, 1)]


def label_names(settings: FinetuneSettings, data: TaskData) -> list[str]:
    """Label names by id (the task module's order). Every validation and test label must be known from training."""
    task = implementation(settings.task)
    seen = task.labels_of(settings, data.train)
    kinds = {type(label).__name__ for label in seen}
    if len(kinds) > 1 or not kinds <= {"str", "int"}:
        raise LlmkitError(f"finetune.source {settings.source}: labels must be all text or all integers, "
                          f"found {', '.join(sorted(kinds))}")
    names = task.label_order(settings, settings.labels or [str(label) for label in sorted(set(seen))])
    for split, rows, source in (("training", data.train, settings.source),
                                ("validation", data.validation, settings.validation_source or settings.source),
                                ("test", data.test, settings.test_source)):
        unknown = sorted({str(label) for label in task.labels_of(settings, rows)} - set(names))
        if unknown:
            where = "is not in finetune.labels" if settings.labels else "never appears in the training data"
            raise LlmkitError(f"{source} ({split} split): label {unknown[0]!r} {where}")
    return names


def encode(settings: FinetuneSettings, tokenizer, rows: list[dict], labels: list[str]):
    """Model features of the rows (llmkit.task_kinds.common.Features), by the task's module."""
    return implementation(settings.task).encode(settings, tokenizer, rows,
                                                      {name: i for i, name in enumerate(labels)})


def collator(task: str, tokenizer, virtual_tokens: int = 0):
    """Pads a batch of the task's features; `virtual_tokens` (prompt tuning) come first in the model's output."""
    return implementation(task).collator(tokenizer, virtual_tokens)
