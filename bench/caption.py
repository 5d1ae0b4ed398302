"""Images as prompts: trains the shipped caption recipe (a tiny vision-language model from scratch on the
generated scenes) and prints, in one run: the training time (wall and this process's CPU seconds, so that a
shared machine shows), then attribute accuracy (colour, shape, count, position read back from the caption)
and caption exact match on new pictures of the compositions seen in training (`shapes-caption:test`) and on
held-out compositions (`shapes-caption:heldout`), beside the text-only baseline that never sees the picture.
Goals (issue #17): training under 15 minutes on 2 CPU cores; attribute accuracy >= 0.95 seen, >= 0.70 held out.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/caption.py [--recipe caption] [--set train.max_steps=...] [--output caption.json]

The run goes to <run.output_dir>/<run.name> (--overwrite replaces an earlier bench's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmkit import finetune, load_recipe
from llmkit.rundir import write_json

SPLITS = {"seen compositions (test)": "shapes-caption:test", "held-out compositions": "shapes-caption:heldout"}
GOALS = {"shapes-caption:test": 0.95, "shapes-caption:heldout": 0.70}  # attribute accuracy
TIME_GOAL = 15 * 60  # seconds of training
METRICS = ("attribute_accuracy", "colour_accuracy", "shape_accuracy", "count_accuracy", "position_accuracy",
           "exact_match", "chrf")


def score_splits(run_dir: Path, batch_size: int) -> dict[str, dict]:
    """Each test split scored as `llmkit eval` scores it (the model's figures and the baseline's)."""
    from llmkit.loading import VISION_HEAD, load_model
    from llmkit.settings import EvalTask
    from llmkit.task_data import score, task_rows

    model, processor = load_model(str(run_dir), head=VISION_HEAD)
    scores = {}
    for source in SPLITS.values():
        task = EvalTask(kind="caption", source=source, split="all")
        scores[source] = score(model, processor, task, task_rows(task), batch_size)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="caption")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override, as `llmkit finetune --set` (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run of an earlier bench")
    parser.add_argument("--output", metavar="JSON", default="caption-bench.json", help="the figures as JSON")
    options = parser.parse_args()

    from rich.table import Table

    from llmkit.console import stdout

    recipe = load_recipe(options.recipe, options.sets)
    wall, cpu = time.perf_counter(), time.process_time()
    result = finetune.run(recipe, overwrite=options.overwrite)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    scores = score_splits(result.run_dir, recipe.train.eval_batch_size)

    table = Table(title=f"{recipe.run.name}: captions of pictures it never saw (greedy)")
    table.add_column("metric", no_wrap=True)
    for name in SPLITS:
        table.add_column(name, justify="right")
        table.add_column("text-only baseline", justify="right")
    for metric in METRICS:
        cells = [f"{scores[source].get(prefix + metric, float('nan')):.4f}" for source in SPLITS.values()
                 for prefix in ("", "baseline_")]
        table.add_row(metric, *cells)
    stdout.print(table)
    met = {source: scores[source]["attribute_accuracy"] >= goal for source, goal in GOALS.items()}
    stdout.print(f"training (finetune, with its evaluations and test scoring): {wall / 60:.1f} min wall, "
                 f"{cpu / 60:.1f} min CPU of this process; goals: time {'met' if wall < TIME_GOAL else 'missed'}, "
                 + ", ".join(f"{name} {'met' if met[source] else 'missed'} (>= {GOALS[source]})"
                             for name, source in SPLITS.items()), highlight=False)
    write_json(Path(options.output), {"recipe": options.recipe, "sets": options.sets, "run": str(result.run_dir),
                                      "seconds": {"wall": round(wall, 1), "cpu": round(cpu, 1)}, "scores": scores})
    stdout.print(f"figures written to {options.output}")


if __name__ == "__main__":
    main()
