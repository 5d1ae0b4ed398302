"""Multi-task against single-task: the multi-task recipe, then each of its tasks trained alone with the same
[model] and [train] settings and the joint run's budget for that task (the same epochs over its data; with
train.max_steps, its share of the joint run's steps), all scored on the same test splits. Prints per task and metric the
single-task figure, the joint one and the difference, and the wall time of every run.

    python bench/multitask.py [--recipe multitask] [--set train.epochs=2 ...] [--output multitask.json]

Runs go to <run.output_dir>/<run.name> (joint) and <run.name>-alone-<task>; --overwrite replaces them.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from llmkit import finetune, load_recipe, tasks
from llmkit.rundir import write_json
from llmkit.settings import Recipe

GOAL = 0.01  # the joint model within 1 point of each single-task model


def single_task_recipes(recipe: Recipe) -> dict[str, Recipe]:
    """task name -> the recipe that trains it alone, as the multi-task recipe would train it. A recipe of
    train.max_steps gives each task the share of the steps its batches have in the joint run."""
    from llmkit.multitask import task_probabilities
    from llmkit.task_data import load_task_data

    entries, train = recipe.finetune.tasks, recipe.train
    shares = [1.0] * len(entries)
    if not train.epochs:
        sizes = [len(load_task_data(recipe.finetune.for_task(entry), recipe.run.seed).train) for entry in entries]
        shares = task_probabilities(sizes, recipe.finetune.task_temperature)
    return {entry.label: dataclasses.replace(
        recipe, run=dataclasses.replace(recipe.run, name=f"{recipe.run.name}-alone-{entry.label}"),
        finetune=recipe.finetune.for_task(entry),
        train=train if train.epochs else dataclasses.replace(train, max_steps=max(1, round(train.max_steps * share))))
        for entry, share in zip(entries, shares)}


def timed_run(recipe: Recipe, overwrite: bool) -> tuple[finetune.FinetuneResult, float]:
    start = time.perf_counter()
    result = finetune.run(recipe, overwrite=overwrite)
    return result, time.perf_counter() - start


def comparison(recipe: Recipe, joint: dict, alone: dict[str, dict]) -> list[dict]:
    """One row per task and headline metric: single, joint, joint - single."""
    rows = []
    for entry in recipe.finetune.tasks:
        for metric in tasks.TASKS[entry.task].headline:
            single, together = alone[entry.label][metric], joint[entry.label][metric]
            rows.append({"task": entry.label, "metric": metric, "single": single, "joint": together,
                         "difference": together - single, "within_goal": together >= single - GOAL})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="multitask", help="a recipe with [[finetune.tasks]]")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override, as `llmkit finetune --set` (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier bench")
    parser.add_argument("--output", metavar="JSON", help="also write the figures here")
    options = parser.parse_args()

    from rich.table import Table

    from llmkit.console import stdout

    recipe = load_recipe(options.recipe, options.sets)
    joint, joint_seconds = timed_run(recipe, options.overwrite)
    alone = {name: timed_run(single, options.overwrite) for name, single in single_task_recipes(recipe).items()}
    rows = comparison(recipe, joint.test_metrics, {name: result.test_metrics for name, (result, _) in alone.items()})

    table = Table(title=f"{recipe.run.name}: one shared encoder against each task alone (test splits)")
    for column in ("task", "metric", "alone", "joint", "joint - alone"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for row in rows:
        table.add_row(row["task"], row["metric"], f"{row['single']:.4f}", f"{row['joint']:.4f}",
                      f"[{'green' if row['within_goal'] else 'red'}]{row['difference']:+.4f}[/]")
    stdout.print(table)
    times = {"joint": joint_seconds} | {f"alone: {name}": seconds for name, (_, seconds) in alone.items()}
    stdout.print("wall time: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in times.items()),
                 highlight=False)
    if options.output:
        write_json(Path(options.output), {"recipe": options.recipe, "sets": options.sets, "rows": rows, "seconds": times})


if __name__ == "__main__":
    main()
