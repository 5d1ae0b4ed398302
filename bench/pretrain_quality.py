"""Loss per character against wall time for the two shipped pretraining recipes, in one run.

Each recipe is pretrained as `llmkit pretrain` runs it (its time budget, train.max_minutes, measured on this
machine), from reading the data to the saved model; the validation loss per char is taken at every
evaluation with the seconds since the start. The finished model is then scored as the goals are stated:
`llmkit eval eval-ppl` (held-out People's Daily, 128-token windows, stride 64), beside the character 4-gram
that pretraining counts on the same split. Printed: a table and JSON; drawn: the curves (PNG).

    python bench/pretrain_quality.py [--recipes pretrain-zh-tiny,pretrain-zh-small] [--set KEY=VALUE ...]
                                     [--output-dir bench-results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from llmkit import evaluate, load_recipe, pretrain
from llmkit.devices import training_precision
from llmkit.rundir import write_json

GOALS = {"pretrain-zh-tiny": (5, 4.25), "pretrain-zh-small": (20, 3.95)}  # (minutes, nats/char), issue 15


class EvalClock(TrainerCallback):
    """(seconds since `start`, validation loss per char) at every evaluation."""

    def __init__(self, start: float):
        self.start, self.points = start, []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.points.append((round(time.perf_counter() - self.start, 1), round(metrics["eval_loss_per_char"], 4)))


def pretrain_and_score(name: str, overrides: list[str], output_dir: Path) -> dict:
    recipe = load_recipe(name, [*overrides, f"run.output_dir={output_dir}"])
    start = time.perf_counter()
    clock = EvalClock(start)
    result = pretrain.run(recipe, overwrite=True, callbacks=[clock])
    seconds = time.perf_counter() - start
    scoring = load_recipe("eval-ppl", [f"eval.output={output_dir / f'{name}-eval-ppl.json'}"])
    scored = evaluate.run(scoring, models=[str(result.run_dir)])[0].metrics
    minutes, goal = GOALS.get(name, (None, None))
    return {"recipe": name, "minutes": round(seconds / 60, 2), "steps": recipe.train.max_steps,
            "budget_minutes": recipe.train.max_minutes, "eval_ppl_loss_per_char": round(scored["loss_per_char"], 4),
            "ngram_loss_per_char": round(result.metrics["baseline_ngram_loss_per_char"], 4),
            "goal": {"minutes": minutes, "loss_per_char": goal,
                     "met": goal is not None and seconds / 60 <= minutes and scored["loss_per_char"] <= goal},
            "curve": clock.points}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        seconds, losses = zip(*row["curve"])
        axes.plot([s / 60 for s in seconds], losses, marker="o", label=row["recipe"])
    axes.axhline(rows[0]["ngram_loss_per_char"], color="grey", linestyle="--", label="character 4-gram")
    axes.set_xlabel("minutes since the start of `llmkit pretrain`")
    axes.set_ylabel("validation loss per char (nats)")
    axes.set_ylim(top=min(6.0, axes.get_ylim()[1]))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(GOALS))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", type=Path, default=Path("bench-results"))
    options = parser.parse_args()
    options.output_dir.mkdir(parents=True, exist_ok=True)
    rows = [pretrain_and_score(name, options.sets, options.output_dir / "runs") for name in options.recipes.split(",")]
    precision = training_precision("auto")
    print(f"{torch.get_num_threads()} threads, training precision {precision.name} ({precision.reason})")
    print(f"{'recipe':20} {'steps':>6} {'minutes':>8} {'eval-ppl nats/char':>19} {'4-gram':>7} {'goal':>15}")
    for row in rows:
        goal = row["goal"]
        target = f"<= {goal['loss_per_char']} in {goal['minutes']} m" if goal["minutes"] else "-"
        print(f"{row['recipe']:20} {row['steps']:6,} {row['minutes']:8.2f} {row['eval_ppl_loss_per_char']:19.4f} "
              f"{row['ngram_loss_per_char']:7.4f} {target:>15} {'met' if goal['met'] else 'not met'}")
    plot(rows, options.output_dir / "pretrain_quality.png")
    write_json(options.output_dir / "pretrain_quality.json", {"threads": torch.get_num_threads(), "runs": rows})
    print(json.dumps({"runs": [{k: v for k, v in row.items() if k != "curve"} for row in rows]}))
    print(f"curves: {options.output_dir / 'pretrain_quality.png'}")


if __name__ == "__main__":
    main()
