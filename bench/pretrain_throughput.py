"""Training throughput of llmkit's Trainer path against a plain PyTorch loop over the same model, honestly.

Both arms train the quickstart model (recipes/pretrain-zh-tiny.toml, or --recipe) built from the same config and
seed, on the same packed blocks, on the same device and in the same precision: the one llmkit picks
(llmkit.devices; --precision to force one), as autocast around the forward pass in both. Both count the same
tokens: block_size x batch_size x gradient_accumulation per optimizer step. The rounds alternate, llmkit then
plain, so that machine noise hits both; each arm is timed in steady state, from the end of its --warmup-th step
to the end of its last, and the ratio llmkit / plain is taken per round: its median and spread (min-max and
interquartile range) are printed, with JSON beside; by the wall clock, and by this process's CPU time, which other
jobs on a shared machine do not inflate (with one thread the CPU time is the work done).

    llmkit arm: llmkit.training.language_model_trainer + train_resumably, as `llmkit pretrain` trains
                (Progress, metrics.jsonl, checkpoint seals, Ctrl-C safety; no evaluation or saving in the window)
    plain arm:  model(input_ids, labels) -> backward -> clip -> fused AdamW step -> cosine schedule, batches
                sliced from one shuffled tensor, loss.item() every log_every steps

    OMP_NUM_THREADS=1 taskset -c 1 python bench/pretrain_throughput.py [--rounds 3] [--steps 40] [--warmup 5]
        [--precision auto|fp32|bf16] [--set KEY=VALUE ...] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

from llmkit import load_recipe
from llmkit.callbacks import MetricsFile
from llmkit.console import quiet_libraries
from llmkit.data import load_text_splits, pack_blocks, texts
from llmkit.devices import pick_device, training_precision
from llmkit.loading import build_model
from llmkit.tokenizer import train_tokenizer
from llmkit.training import language_model_trainer, train_resumably, training_arguments


class StepClock(TrainerCallback):
    """The clocks at the end of the warm-up step and of the last step (GPU work finished first)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        if state.global_step == self.warmup:
            self.start = clocks()
        self.end = clocks()


def clocks() -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process): on a machine shared with other jobs the wall clock
    counts the time they take the cores too; the CPU time counts this process's own work only."""
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return end[0] - start[0], end[1] - start[1]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def llmkit_arm(recipe, tokenizer, blocks, warmup: int, workdir: Path) -> tuple[tuple[float, float], float]:
    """((wall, CPU) seconds of the steady-state steps, the last logged training loss) of llmkit's training path."""
    transformers.set_seed(recipe.run.seed)
    model = build_model(recipe, tokenizer)
    args = training_arguments(recipe.train, recipe.distributed, recipe.run.seed, workdir / "checkpoints")
    clock = StepClock(warmup)
    trainer = language_model_trainer(recipe, model, tokenizer, args, blocks, blocks.select(range(1)), None,
                                     callbacks=[MetricsFile(workdir / "metrics.jsonl"), clock])
    train_resumably(trainer, workdir, False, "pretrain")
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return elapsed(clock.start, clock.end), losses[-1] if losses else float("nan")


def plain_arm(recipe, tokenizer, blocks, warmup: int, precision) -> tuple[tuple[float, float], float]:
    """((wall, CPU) seconds of the steady-state steps, the last training loss) of the textbook loop."""
    transformers.set_seed(recipe.run.seed)
    device = pick_device("auto")
    model = build_model(recipe, tokenizer).to(device).train()
    train = recipe.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train.learning_rate, betas=(0.9, train.adam_beta2), fused=True)
    warmup_steps = int(train.warmup_steps * train.max_steps) if train.warmup_steps < 1 else int(train.warmup_steps)
    schedule = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps, train.max_steps, min_lr_rate=train.min_lr_ratio)
    data = torch.as_tensor(blocks["input_ids"], dtype=torch.long, device=device)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(recipe.run.seed)).to(device)
    micro, last_loss = train.batch_size, float("nan")
    for step in range(train.max_steps):
        for part in range(train.gradient_accumulation):
            first = (step * train.gradient_accumulation + part) * micro
            batch = data[order[(torch.arange(micro, device=device) + first) % len(data)]]
            with torch.autocast(device.split(":")[0], dtype=precision.dtype, enabled=precision.name != "fp32"):
                loss = model(input_ids=batch, labels=batch).loss / train.gradient_accumulation
            loss.backward()
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % train.log_every == 0:
            last_loss = loss.item() * train.gradient_accumulation  # what any loop that logs pays too
        synchronize()
        if step + 1 == warmup:
            start = clocks()
    return elapsed(start, clocks()), last_loss


def spread(values: list[float]) -> dict:
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "q1": round(quartiles[0], 3), "q3": round(quartiles[2], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pretrain-zh-tiny")
    parser.add_argument("--rounds", type=int, default=3, help="llmkit/plain pairs (default 3)")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per arm and round (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--precision", default="auto", help="auto (llmkit's rule), fp32, bf16 or fp16")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the JSON to this file")
    options = parser.parse_args()
    quiet_libraries()
    total = options.warmup + options.steps
    recipe = load_recipe(options.recipe, [f"train.max_steps={total}", f"train.eval_every={10 * total}",
                                          f"train.save_every={10 * total}", "generate.prompts=[]",
                                          f"train.precision={options.precision}", *options.sets])
    precision = training_precision(recipe.train.precision)
    splits = load_text_splits(recipe.data)
    tokenizer = train_tokenizer(list(texts(splits.train)), recipe.tokenizer, recipe.train.objective)
    blocks, _ = pack_blocks(splits.train, tokenizer, recipe.data.block_size)
    blocks = blocks.with_format(None)
    tokens_per_step = recipe.data.block_size * recipe.train.batch_size * recipe.train.gradient_accumulation
    arms = {"llmkit": lambda workdir: llmkit_arm(recipe, tokenizer, blocks, options.warmup, workdir),
            "plain": lambda workdir: plain_arm(recipe, tokenizer, blocks, options.warmup, precision)}
    rates = {(arm, clock): [] for arm in arms for clock in ("wall", "cpu")}
    losses: dict[str, list[float]] = {arm: [] for arm in arms}
    for round_index in range(options.rounds):
        for arm, train in arms.items():  # llmkit, plain, llmkit, plain, ...
            with tempfile.TemporaryDirectory() as workdir:
                (wall, cpu), loss = train(Path(workdir))
            rates[arm, "wall"].append(tokens_per_step * options.steps / wall)
            rates[arm, "cpu"].append(tokens_per_step * options.steps / cpu)
            losses[arm].append(loss)
        print(f"round {round_index + 1}: llmkit {rates['llmkit', 'wall'][-1]:,.0f} tok/s, plain "
              f"{rates['plain', 'wall'][-1]:,.0f} tok/s (wall clock); per CPU second: llmkit "
              f"{rates['llmkit', 'cpu'][-1]:,.0f}, plain {rates['plain', 'cpu'][-1]:,.0f}", flush=True)
    ratios = {clock: [a / b for a, b in zip(rates["llmkit", clock], rates["plain", clock])] for clock in ("wall", "cpu")}
    result = {
        "recipe": options.recipe, "device": pick_device("auto"), "precision": precision.name,
        "precision_reason": precision.reason, "threads": torch.get_num_threads(), "rounds": options.rounds,
        "timed_steps": options.steps, "warmup_steps": options.warmup, "tokens_per_step": tokens_per_step,
        "llmkit_tokens_per_s": spread(rates["llmkit", "wall"]), "plain_tokens_per_s": spread(rates["plain", "wall"]),
        "ratio": spread(ratios["wall"]), "ratio_each_round": [round(r, 3) for r in ratios["wall"]],
        "llmkit_tokens_per_cpu_s": spread(rates["llmkit", "cpu"]),
        "plain_tokens_per_cpu_s": spread(rates["plain", "cpu"]),
        "ratio_cpu": spread(ratios["cpu"]), "ratio_cpu_each_round": [round(r, 3) for r in ratios["cpu"]],
        "last_loss": {arm: [None if x != x else round(x, 4) for x in values] for arm, values in losses.items()},
    }
    show(result)
    text = json.dumps(result)
    print(text)
    if options.json_path:
        Path(options.json_path).write_text(text + "\n", encoding="utf-8")


def show(result: dict) -> None:
    from rich.table import Table

    from llmkit.console import stdout

    table = Table(title=f"{result['recipe']}: {result['rounds']} rounds x {result['timed_steps']} steps after "
                        f"{result['warmup_steps']} warm-up, {result['device']}, {result['precision']}, "
                        f"{result['threads']} thread(s)")
    for column in ("", "median", "min", "max", "IQR"):
        table.add_column(column, justify="right" if column else "left")
    for label, key, form in (("llmkit tok/s", "llmkit_tokens_per_s", "{:,.0f}"),
                             ("plain tok/s", "plain_tokens_per_s", "{:,.0f}"), ("llmkit / plain", "ratio", "{:.3f}"),
                             ("llmkit tok per CPU s", "llmkit_tokens_per_cpu_s", "{:,.0f}"),
                             ("plain tok per CPU s", "plain_tokens_per_cpu_s", "{:,.0f}"),
                             ("llmkit / plain (CPU time)", "ratio_cpu", "{:.3f}")):
        row = result[key]
        table.add_row(label, *(form.format(row[k]) for k in ("median", "min", "max")),
                      f"{form.format(row['q1'])} - {form.format(row['q3'])}")
    stdout.print(table)


if __name__ == "__main__":
    main()
