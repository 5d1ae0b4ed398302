"""Glue around Hugging Face `Trainer` shared by the training commands: progress display, metrics
file, Ctrl-C safety, samples during training, and the derived metrics (perplexity, loss per char)."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from llmkit.console import console
from llmkit.errors import LlmkitError
from llmkit.generation import continue_prompts
from llmkit.rundir import append_jsonl
from llmkit.settings import GenerateSettings


SHOWN_METRICS = {"eval_perplexity": "perplexity", "eval_loss_per_char": "loss/char (nats)", "eval_accuracy": "accuracy",
                 "eval_f1": "F1", "eval_exact_match": "exact match"}


class LlmkitTrainer(Trainer):
    """Trainer that adds perplexity and loss per character to every evaluation it logs."""

    def __init__(self, *args, tokens_per_char: float | None = None, perplexity: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_per_char = tokens_per_char
        self.perplexity = perplexity  # False for classifiers: their loss is not a language model's

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs and self.perplexity:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            if self.tokens_per_char:
                # total NLL / characters = mean token NLL x tokens per character, so that models
                # with different tokenizers compare.
                logs["eval_loss_per_char"] = logs["eval_loss"] * self.tokens_per_char
        super().log(logs, start_time)


def trained_model(trainer):
    """The trained model as saved and as `llmkit eval` scores it: without the mixed-precision (autocast)
    wrapper that Trainer puts on its forward when training in bf16/fp16."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


def collate_blocks(rows: list[dict]) -> dict:
    """Stack equal-length packed blocks (rows in torch format: no Python lists on the hot path);
    causal LM labels are the inputs (the model shifts them)."""
    import torch

    input_ids = torch.stack([row["input_ids"] for row in rows]).long()
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def train_resumably(trainer, run_dir: Path, resume: bool, command: str) -> None:
    """Train, from the run's newest complete checkpoint when resuming; every checkpoint is sealed once
    written; Ctrl-C or SIGTERM saves a checkpoint and raises Interrupted, which says how to continue."""
    from llmkit import rundir
    from llmkit.errors import Interrupted

    stopper = StopOnInterrupt()
    trainer.add_callback(stopper)
    trainer.add_callback(SealCheckpoints())
    checkpoint = rundir.last_checkpoint(run_dir) if resume else None
    if checkpoint is not None and trainer.args.process_index == 0:
        for skipped in rundir.skipped_checkpoints(run_dir):
            console.print(f"skipping {skipped}: incomplete (cut short or damaged)")
        rundir.truncate_metrics(run_dir / "metrics.jsonl", int(checkpoint.name.split("-")[-1]))
        console.print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stopper.interrupted:
        raise Interrupted(f"checkpoint saved in {rundir.last_checkpoint(run_dir)}; continue with "
                          f"`llmkit {command} RECIPE --resume`")


# Keys that may change when a run is continued: how long it runs and how often it reports and saves.
SAFE_ON_RESUME = ("train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.log_every",
                  "train.keep_checkpoints", "train.eval_batch_size", "train.dataloader_workers", "run.output_dir",
                  "generate.", "eval.", "quantize.")


def check_resume_recipe(recipe, run_dir: Path, force: bool) -> None:
    """Continuing a run with another recipe: the keys in SAFE_ON_RESUME may differ (reported); any other
    difference is refused unless forced, naming the keys."""
    from llmkit.recipe import load_recipe, recipe_to_dict

    saved_file = run_dir / "recipe.toml"
    if not saved_file.is_file():
        return
    saved, current = flat(recipe_to_dict(load_recipe(saved_file))), flat(recipe_to_dict(recipe))
    changed = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    refused = [key for key in changed if not key.startswith(SAFE_ON_RESUME)]
    if refused and not force:
        raise LlmkitError(f"--resume: the recipe differs from the run's ({saved_file}) in "
                          f"{', '.join(f'{k} ({saved.get(k)!r} -> {current.get(k)!r})' for k in refused)}; "
                          f"continue with --force to accept, or train a new run")
    if changed:
        console.print(f"resuming with changed {', '.join(changed)}", highlight=False)


def flat(tables: dict, prefix: str = "") -> dict:
    """{"train": {"max_steps": 5}} -> {"train.max_steps": 5}"""
    rows = {}
    for key, value in tables.items():
        if isinstance(value, dict):
            rows |= flat(value, f"{prefix}{key}.")
        else:
            rows[f"{prefix}{key}"] = value
    return rows


class SealCheckpoints(TrainerCallback):
    """Seal each checkpoint once Trainer has written all of it: only sealed, intact checkpoints resume."""

    def on_save(self, args, state, control, **kwargs):
        from llmkit.rundir import seal_checkpoint

        if state.is_world_process_zero:
            seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class MetricsFile(TrainerCallback):
    """Append every log row (training loss, evaluation metrics) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, **logs})


class StopOnInterrupt(TrainerCallback):
    """First Ctrl-C or SIGTERM (what schedulers and `docker stop` send): finish the current step, save a
    checkpoint, stop. A second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.interrupted = False
        self.previous_handlers = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous_handlers = {number: signal.signal(number, self.handle) for number in self.SIGNALS}

    def handle(self, signum, frame):
        self.interrupted = True
        self.restore()
        console.print(f"\n[yellow]{signal.Signals(signum).name}: saving a checkpoint after this step "
                      f"(again to abort)[/]")

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for number, handler in self.previous_handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self.previous_handlers = {}


class ShowSamples(TrainerCallback):
    """After each evaluation, print continuations of the recipe's prompts: people watch them improve."""

    def __init__(self, tokenizer, settings: GenerateSettings, seed: int):
        self.tokenizer, self.settings, self.seed = tokenizer, settings, seed

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None and self.settings.prompts:
            for text in continue_prompts(model, self.tokenizer, self.settings.prompts, self.settings, self.seed):
                console.print(f"  [dim]sample:[/] {text}", markup=True, highlight=False)


class Progress(TrainerCallback):
    """Step, loss, tokens/s and ETA: a live bar on a terminal, plain lines in logs and CI."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.bar = None
        self.task = None
        self.last_time = self.last_step = None
        self.fields = {"loss": float("nan"), "tps": 0.0}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.last_time, self.last_step = time.perf_counter(), state.global_step
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                                TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
            self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step, **self.fields)
            self.bar.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            now = time.perf_counter()
            steps = state.global_step - self.last_step
            self.fields = {"loss": logs["loss"], "tps": steps * self.tokens_per_step / max(now - self.last_time, 1e-9)}
            self.last_time, self.last_step = now, state.global_step
            if self.bar is not None:
                self.bar.update(self.task, **self.fields)
            else:
                console.print(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                              f"lr {logs.get('learning_rate', 0):.2e}  {self.fields['tps']:,.0f} tok/s",
                              highlight=False)
        if "eval_loss" in logs:
            parts = [f"eval loss {logs['eval_loss']:.4f}"]
            parts += [f"{label} {logs[key]:.4f}" for key, label in SHOWN_METRICS.items() if key in logs]
            console.print(f"step {state.global_step}: " + "  ".join(parts), highlight=False)
            self.last_time = time.perf_counter()  # evaluation time is not training throughput

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.stop()
