"""Trainer callbacks llmkit adds to every training run: progress (a live bar on a terminal, plain lines in
logs), the metrics file, checkpoint seals, Ctrl-C/SIGTERM safety, and samples shown as a model learns."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from llmkit.console import console
from llmkit.generation import continue_prompts
from llmkit.rundir import append_jsonl, seal_checkpoint
from llmkit.settings import GenerateSettings

SHOWN_METRICS = {"eval_perplexity": "perplexity", "eval_loss_per_char": "loss/char (nats)", "eval_accuracy": "accuracy",
                 "eval_f1": "F1", "eval_exact_match": "exact match", "eval_mlm_loss": "MLM loss",
                 "eval_nsp_accuracy": "NSP accuracy", "eval_mean_score": "mean score"}


class SealCheckpoints(TrainerCallback):
    """Seal each checkpoint once Trainer has written all of it: only sealed, intact checkpoints resume."""

    def on_save(self, args, state, control, **kwargs):
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
            parts += [f"{task} {SHOWN_METRICS[f'eval_{metric}']} {value:.4f}"  # multi-task: eval_<task>/<metric>
                      for task, metric, value in per_task(logs) if f"eval_{metric}" in SHOWN_METRICS]
            console.print(f"step {state.global_step}: " + "  ".join(parts), highlight=False)
            self.last_time = time.perf_counter()  # evaluation time is not training throughput

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.stop()


def per_task(logs: dict) -> list[tuple[str, str, float]]:
    """(task, metric, value) of a multi-task evaluation's eval_<task>/<metric> entries."""
    split = [(key.removeprefix("eval_").partition("/"), value) for key, value in logs.items()]
    return [(task, metric, value) for (task, slash, metric), value in split if slash]
