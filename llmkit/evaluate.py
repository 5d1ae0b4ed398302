"""`llmkit eval`: score one or more models on one or more tasks, side by side.

    from llmkit import load_recipe
    from llmkit.evaluate import run

    results = run(load_recipe("eval-ppl"), models=["runs/pretrain-zh-tiny"])

Each task reads its data once (every input is checked before any model loads); each model is loaded
once per head. The scorers are the tasks' own (llmkit.tasks). Results: a rich table, `eval.output`
(JSON), and a row per task in each run's evaluations.jsonl.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from llmkit import tasks
from llmkit.errors import LlmkitError
from llmkit.rundir import OWNER_MARK, append_jsonl, write_json
from llmkit.settings import Recipe
from llmkit.task_data import score, table_cells, task_name, task_rows

RESULTS_MARK = "llmkit eval"  # "made_by" of the results file: the only file eval.output may replace
ENGINE_KINDS = ("perplexity", "generation")  # scored by eval.engine (llmkit.engines); the others by transformers
EVALUATIONS_FILE = "evaluations.jsonl"  # in a run folder: every `llmkit eval` of that run, one row per task


@dataclass
class EvalResult:
    model: str
    task: str
    kind: str
    metrics: dict


def run(recipe: Recipe, models: list[str] | None = None, limit: int | None = None) -> list[EvalResult]:
    from llmkit.console import console, quiet_libraries, stdout
    from llmkit.engines import Ct2Model, load_generator
    from llmkit.loading import load_model, resolve_model

    quiet_libraries()
    settings = recipe.eval
    check_results_file(Path(settings.output))
    limit = settings.limit if limit is None else limit
    data = {task_name(task): (task, task_rows(task, limit, f"eval.tasks[{index}]"))
            for index, task in enumerate(settings.tasks)}
    names = models or settings.models
    # No models named: each task scores the newest model with its head (runs/latest, latest-<head>).
    pairs = [(resolve_model(model, recipe.run.output_dir, tasks.TASKS[task.kind].head), name)
             for model in (names or [None]) for name, (task, _) in data.items()]
    results = []
    for source in dict.fromkeys(source for source, _ in pairs):
        loaded: dict[str, tuple] = {}
        for name in (name for model, name in pairs if model == source):
            task, rows = data[name]
            head = tasks.TASKS[task.kind].head
            key = (head, task.kind in ENGINE_KINDS)
            if key not in loaded:
                loaded[key] = (load_generator(source, engine=settings.engine, threads=settings.threads,
                                              device=settings.device) if key[1]
                               else load_model(source, device=settings.device, head=head))
            model, tokenizer = loaded[key]
            with console.status(f"{Path(source).name}: {name} ({len(rows):,} examples)"):
                start = time.perf_counter()
                metrics = score(model, tokenizer, task, rows, settings.batch_size)
            metrics["seconds"] = round(time.perf_counter() - start, 2)
            if key[1]:
                metrics["engine"] = "ct2" if isinstance(model, Ct2Model) else "hf"
            results.append(EvalResult(source, name, task.kind, metrics))
    report(results, settings.output, stdout)
    return results


def report(results: list[EvalResult], output: str, console) -> None:
    """One table (rows: task metric, columns: models), the JSON file, and a row per run's metrics.jsonl."""
    from rich.table import Table

    models = list(dict.fromkeys(r.model for r in results))
    table = Table(title="llmkit eval")
    table.add_column("task")
    table.add_column("metric")
    for model in models:
        table.add_column(Path(model).name or model, justify="right")
    by_key = {(r.model, r.task): r for r in results}
    for task in dict.fromkeys(r.task for r in results):
        kind = next(r.kind for r in results if r.task == task)
        cells = {m: dict(table_cells(kind, by_key[(m, task)].metrics)) for m in models}
        for metric in dict.fromkeys(label for m in models for label in cells[m]):
            table.add_row(task, metric, *(format_metric(cells[m].get(metric)) for m in models))
    console.print(table)
    write_json(Path(output), {"made_by": RESULTS_MARK, "results": [vars(r) for r in results]})
    console.print(f"results written to {output}")
    for result in results:  # a run keeps its scores beside its training metrics, in a file of their own
        if (Path(result.model) / OWNER_MARK).is_file():
            append_jsonl(Path(result.model) / EVALUATIONS_FILE,
                         {"eval_task": result.task, "eval_kind": result.kind, **result.metrics})


def check_results_file(path: Path) -> None:
    """eval.output is a .json file: new, or one that llmkit eval wrote (never a file a user made)."""
    if path.suffix != ".json":
        raise LlmkitError(f"eval.output must be a .json file, got {str(path)!r}")
    if path.is_dir():
        raise LlmkitError(f"eval.output {path} is a folder; name a .json file")
    if path.exists():
        try:
            made_by = json.loads(path.read_text(encoding="utf-8")).get("made_by")
        except (OSError, ValueError, AttributeError):
            made_by = None
        if made_by != RESULTS_MARK:
            raise LlmkitError(f"eval.output {path} exists and is not an llmkit eval result; name another file")


def format_metric(value) -> str:
    """A table cell: 4 places for a fraction, yes/no, and a figure with its 95% interval as `0.6120 [0.5905, 0.6335]`."""
    if isinstance(value, tuple):
        figure, (low, high) = value
        return f"{format_metric(figure)} [{low:.4f}, {high:.4f}]"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
