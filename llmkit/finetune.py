"""`llmkit finetune`: adapt a model to a task (classification, token classification, extractive QA,
instruction tuning: llmkit.tasks) by full tuning or PEFT (LoRA, DoRA, QLoRA, prompt and prefix tuning),
with optional knowledge distillation from a teacher.

setup (data, tokenizer, model: everything that can refuse bad input, before the disk is touched)
-> train (HF Trainer, best checkpoint by a validation metric) -> finish (test scores, model, card).

    from llmkit import load_recipe
    from llmkit.finetune import run

    result = run(load_recipe("classify"))
    print(result.test_metrics["accuracy"])
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from llmkit import task_data, tasks
from llmkit.errors import LlmkitError
from llmkit.settings import FinetuneSettings, Recipe


@dataclass
class FinetuneResult:
    run_dir: Path
    validation_metrics: dict  # of the kept (best) checkpoint
    test_metrics: dict  # finetune.test_source scored once at the end; {} without one
    # multi-task (finetune.tasks): both are {task name: its metrics}, and validation also holds "mean_score"


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False, callbacks: list | None = None,
        force: bool = False) -> FinetuneResult:
    """Fine-tune as the recipe says; `callbacks` (transformers TrainerCallback) join the Trainer's.
    `force`: resume although the recipe differs from the run's in keys that matter."""
    from llmkit import rundir
    from llmkit.console import quiet_libraries, stdout
    from llmkit.loading import VISION_HEAD, loaded_config, resolve_model
    from llmkit.training import run_folder
    from llmkit.vision import check_vision_model

    quiet_libraries()
    settings = recipe.finetune
    run_dir = rundir.run_dir_for(recipe.run.output_dir, recipe.run.name)
    if settings.method != "full" and not recipe.model.path:
        raise LlmkitError(f'finetune.method = "{settings.method}" trains an adapter on a base model: set model.path '
                          f'(a run, model directory or hub id), or use method = "full" to train from scratch')
    if settings.method != "full" and Path(recipe.model.path).resolve() == run_dir.resolve():
        raise LlmkitError(f"model.path {recipe.model.path} is this run's own folder: an adapter needs its base model "
                          f"to stay; set another run.name")
    if tasks.TASKS[settings.task].head == VISION_HEAD and recipe.model.path and not settings.tasks:
        check_vision_model(recipe.model.path, loaded_config(resolve_model(recipe.model.path)))
    if settings.tasks and recipe.distill.teacher:
        raise LlmkitError("distill.teacher: multi-task fine-tuning (finetune.tasks) does not distill; "
                          "distill each task's model on its own")
    with run_folder(recipe, overwrite, resume, force) as folder:
        validation, test, main = (train_tasks if settings.tasks else train)(recipe, folder, resume, callbacks)
    if main and settings.tasks:
        show_task_results(stdout, run_dir, settings, validation, test)
    elif main:
        rundir.point_latest(run_dir, tasks.TASKS[settings.task].head)
        show_results(stdout, run_dir, settings, validation, test)
    return FinetuneResult(run_dir, validation, test)


def train(recipe: Recipe, folder, resume: bool, callbacks: list | None):
    """Set up (everything that can refuse the input runs before the disk is touched), train into
    `folder.work_dir` (a rundir.RunFolder) and finish there;
    -> (validation metrics, test metrics, whether this is the main process)."""
    import datasets
    import transformers

    from llmkit import rundir
    from llmkit.adapters import apply_method
    from llmkit.callbacks import MetricsFile
    from llmkit.console import console
    from llmkit.devices import training_precision
    from llmkit.loading import build_task_model
    from llmkit.training import start_run, train_resumably, training_arguments

    work_dir = folder.work_dir
    settings = recipe.finetune
    # First: under a launcher this joins the processes, which task_tokenizer needs.
    metric = settings.metric or tasks.selection_metrics(settings.task)[0]
    args = training_arguments(recipe.train, recipe.distributed, recipe.run.seed, work_dir / rundir.CHECKPOINTS,
                              load_best_model_at_end=True, metric_for_best_model=metric,
                              greater_is_better=not metric.endswith("loss"), remove_unused_columns=False,
                              # batches of similar lengths: little padding (llmkit.tasks says where not)
                              train_sampling_strategy="group_by_length" if tasks.TASKS[settings.task].group_by_length
                              else "random",
                              label_names=list(tasks.TASKS[settings.task].targets),
                              **({"save_steps": recipe.train.eval_every} if recipe.train.eval_every else {}))
    with console.status("reading data"):
        data = task_data.load_task_data(settings, recipe.run.seed)
    with console.status("preparing the tokenizer"):
        tokenizer = task_tokenizer(recipe, [(settings, data)])
    teacher = load_teacher(recipe, tokenizer, data.labels) if recipe.distill.teacher else None
    transformers.set_seed(recipe.run.seed)
    with console.status("loading the model"):
        model = apply_method(settings, build_task_model(recipe, tokenizer, data.labels))
    tokenizer = task_processor(recipe, tokenizer)
    train_features, validation_features = map(datasets.Dataset.from_list, encode_splits(recipe, tokenizer, data, model))

    start_run(folder, recipe, args, resume, data_fingerprint(data))
    if args.process_index == 0:
        describe_setup(console, model, settings, data, train_features, training_precision(recipe.train.precision))

    trainer = make_trainer(recipe, model, tokenizer, args, train_features, validation_features, data, teacher,
                           callbacks=[MetricsFile(work_dir / "metrics.jsonl"), *(callbacks or [])])
    train_resumably(trainer, work_dir, resume, "finetune")
    validation, test = finish(recipe, trainer, tokenizer, data, work_dir)
    return validation, test, args.process_index == 0


# ---------------------------------------------------------------- setup


def task_tokenizer(recipe: Recipe, parts: list[tuple[FinetuneSettings, task_data.TaskData]]):
    """The base model's tokenizer, or one trained on the training texts of the task (or tasks: parts holds
    each one's settings and data); padded (a task's module may prepare it further: a chat template for
    instruction tuning)."""
    from llmkit.distributed import once_for_all
    from llmkit.loading import objective_of, resolve_model
    from llmkit.tokenizer import load_tokenizer, train_tokenizer

    source = recipe.tokenizer.path or (resolve_model(recipe.model.path) if recipe.model.path else "")
    if source:
        tokenizer = load_tokenizer(source)
    else:
        objective = objective_of(recipe.model.arch, tasks.TASKS[parts[0][0].task].head)
        texts = [text for settings, data in parts
                 for text in task_data.implementation(settings.task).training_texts(settings, data.train)]
        # trained once, on the main process: every process must use the very same vocabulary
        tokenizer = once_for_all(lambda: train_tokenizer(texts, recipe.tokenizer, objective))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    for settings, _ in parts:
        prepare = getattr(task_data.implementation(settings.task), "prepare_tokenizer", None)
        if prepare:
            prepare(tokenizer, settings)
    return tokenizer


def task_processor(recipe: Recipe, tokenizer):
    """What reads a task's inputs, saved beside the model: the tokenizer, or a vision task's processor (its
    image processor and the tokenizer)."""
    from llmkit.loading import resolve_model

    processing = getattr(task_data.implementation(recipe.finetune.task), "processing_class", None)
    if not processing:
        return tokenizer
    return processing(recipe, tokenizer, resolve_model(recipe.model.path) if recipe.model.path else "")


def load_teacher(recipe: Recipe, tokenizer, labels: list[str]):
    """The distillation teacher, frozen; it must read the student's tokens and predict its labels."""
    from llmkit.loading import load_model

    task = tasks.TASKS[recipe.finetune.task]
    if not task.distillable:
        distillable = ", ".join(name for name, entry in tasks.TASKS.items() if entry.distillable)
        raise LlmkitError(f"distill.teacher: distillation covers {distillable}, not {recipe.finetune.task}")
    teacher, teacher_tokenizer = load_model(recipe.distill.teacher, head=task.head)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise LlmkitError(f"distill.teacher {recipe.distill.teacher}: its tokenizer differs from the student's; "
                          f"set tokenizer.path (or model.path) to the teacher so that both read the same tokens")
    teacher_labels = [str(teacher.config.id2label[i]) for i in range(len(teacher.config.id2label))] if labels else []
    if labels and teacher_labels != labels:
        raise LlmkitError(f"distill.teacher {recipe.distill.teacher}: its labels {teacher_labels} differ from the "
                          f"task's {labels}")
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def encode_splits(recipe: Recipe, tokenizer, data, model) -> list[list[dict]]:
    """Training and validation feature rows; truncation and dropped examples are reported."""
    from llmkit.console import console
    from llmkit.loading import model_positions

    settings = recipe.finetune
    positions = model_positions(model.config)
    if positions and settings.max_length > positions:
        console.print(f"[yellow]finetune.max_length = {settings.max_length} exceeds the model's {positions} "
                      f"positions: using {positions}[/]")
        settings.max_length = positions
    splits = []
    for name, rows in (("training", data.train), ("validation", data.validation)):
        features = task_data.encode(settings, tokenizer, rows, data.labels)
        if features.truncated:
            console.print(f"[yellow]{features.truncated:,} of {len(rows):,} {name} examples are longer than "
                          f"finetune.max_length = {settings.max_length} tokens and were truncated[/]")
        if features.dropped:
            console.print(f"[yellow]{features.dropped:,} {name} examples were left out: their answer lies beyond "
                          f"the first {settings.max_length} tokens[/]")
        if not features.rows:
            raise LlmkitError(f"finetune.source {settings.source}: no usable {name} examples")
        splits.append(features.rows)
    return splits


def data_fingerprint(*parts) -> str:
    """Of the training and validation rows of the task (or each task, in order)."""
    from llmkit.data import fingerprint

    return fingerprint([json.dumps(row, ensure_ascii=False, sort_keys=True)
                        for data in parts for row in data.train + data.validation])


def describe_setup(console, model, settings, data, train_features, precision) -> None:
    from llmkit.distributed import full_size

    total = sum(full_size(p) for p in model.parameters())
    trainable = sum(full_size(p) for p in model.parameters() if p.requires_grad)
    labels = f", {len(data.labels)} labels" if data.labels else ""
    console.print(f"{settings.task} by {settings.method}: {model.config.model_type}, {total / 1e6:.2f}M parameters "
                  f"({trainable / total:.1%} trained); data: {len(train_features):,} training / "
                  f"{len(data.validation):,} validation / {len(data.test):,} test examples{labels}; "
                  f"{precision.name} ({precision.reason})", highlight=False)


# ---------------------------------------------------------------- training


def make_trainer(recipe: Recipe, model, tokenizer, args, train_features, validation_features, data, teacher,
                 callbacks):
    from transformers import EarlyStoppingCallback, PrinterCallback

    from llmkit.callbacks import Progress
    from llmkit.training import LlmkitTrainer, tokens_per_step

    settings = recipe.finetune
    mean_tokens = sum(len(ids) for ids in train_features["input_ids"]) / len(train_features)
    callbacks = [Progress(tokens_per_step(mean_tokens, args)), *callbacks]
    if settings.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    trainer = LlmkitTrainer(
        model=model, args=args, train_dataset=train_features, eval_dataset=validation_features,
        data_collator=task_data.collator(settings.task, tokenizer,
                               settings.num_virtual_tokens if settings.method == "prompt-tuning" else 0),
        processing_class=tokenizer, callbacks=callbacks,
        perplexity=tasks.TASKS[settings.task].head == "causal-lm", class_weights=class_weights(settings, data),
        teacher=teacher, distill=recipe.distill, score_validation=validation_scorer(recipe, tokenizer, data))
    trainer.remove_callback(PrinterCallback)  # Progress prints instead
    return trainer


def class_weights(settings, data):
    """The task module's loss weights per class (classification: finetune.class_weights), else None."""
    weights = getattr(task_data.implementation(settings.task), "loss_weights", None)
    return weights(settings, data.train, data.label2id) if weights else None


def validation_scorer(recipe: Recipe, tokenizer, data):
    """model -> validation metrics, scored like `llmkit eval` (causal LMs: the loss is the measure)."""

    settings = recipe.finetune
    if not tasks.TASKS[settings.task].select_by:  # instruction tuning: generating is too slow to do at every evaluation
        return None
    task = task_data.eval_task(settings, settings.validation_source or settings.source)
    return lambda model: task_data.score(model, tokenizer, task, data.validation, recipe.train.eval_batch_size)


# ---------------------------------------------------------------- finish


def finish(recipe: Recipe, trainer, tokenizer, data, run_dir: Path) -> tuple[dict, dict]:
    from llmkit.console import console
    from llmkit.training import trained_model

    settings = recipe.finetune
    validation = {k[len("eval_"):]: v for k, v in best_evaluation(trainer).items()}
    trainer.save_model(str(run_dir))
    test: dict = {}
    if trainer.is_world_process_zero():
        model = trained_model(trainer)
        if settings.method != "full":
            save_head_config(model, run_dir)
        if settings.merge:
            with console.status("merging the adapter into the base model"):
                merge(recipe, tokenizer, data.labels, run_dir)
        if data.test:
            with console.status(f"scoring {len(data.test):,} test examples"):
                test = score_test(recipe, model, tokenizer, data)
            baseline = getattr(task_data.implementation(settings.task), "baseline", None)
            if baseline:  # a simple method scored on the same test rows, beside the model (baseline_<metric>)
                test |= baseline(settings, data.train, data.test)
        write_reports(recipe, trainer, tokenizer, data, run_dir, validation, test)
    return validation, test


def best_evaluation(trainer) -> dict:
    """The evaluation of the checkpoint kept (the best one), else the last one."""
    evaluations = [row for row in trainer.state.log_history if "eval_loss" in row]
    best_step = None
    if trainer.state.best_model_checkpoint:
        best_step = int(trainer.state.best_model_checkpoint.rstrip("/").split("-")[-1])
    chosen = next((row for row in evaluations if row["step"] == best_step), evaluations[-1] if evaluations else {})
    return {k: v for k, v in chosen.items() if k.startswith("eval_") and isinstance(v, (int, float))}


def save_head_config(model, run_dir: Path) -> None:
    """An adapter run keeps the task model's config (head, labels) so that it reloads onto its base."""
    from llmkit.rundir import write_json

    base = model.get_base_model()
    config = base.config.to_dict() | {"architectures": [type(base).__name__]}
    config.pop("quantization_config", None)  # the adapter loads onto the base in full precision
    write_json(run_dir / "config.json", config)


def merge(recipe: Recipe, tokenizer, labels: list[str], run_dir: Path) -> None:
    from llmkit.adapters import merge_adapter
    from llmkit.loading import build_task_model, text_tokenizer

    merged = run_dir / "merged"
    merge_adapter(run_dir, merged, lambda: build_task_model(recipe, text_tokenizer(tokenizer), labels, quantize=False))
    tokenizer.save_pretrained(str(merged))


def score_test(recipe: Recipe, model, tokenizer, data) -> dict:
    """The held-out test split, scored once with the kept model, as `llmkit eval` scores it."""

    settings = recipe.finetune
    model.eval()
    scoring_rows = getattr(task_data.implementation(settings.task), "scoring_rows", None)
    if scoring_rows:  # instruction tuning: conversations become prompts and references
        task, rows = scoring_rows(settings, tokenizer, data.test)
    else:
        task, rows = task_data.eval_task(settings, settings.test_source), data.test
    return task_data.score(model, tokenizer, task, rows, recipe.train.eval_batch_size)


def write_reports(recipe: Recipe, trainer, tokenizer, data, run_dir: Path, validation: dict, test: dict) -> None:
    from llmkit import rundir
    from llmkit.report import plot_losses

    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", title=recipe.run.name)
    rundir.write_json(run_dir / "final_metrics.json",
                      {"step": trainer.state.global_step, "validation": validation, "test": test})
    write_card(recipe, recipe.run.name, trainer.model, tokenizer, data, run_dir / "README.md",
               rundir.run_dir_for(recipe.run.output_dir, recipe.run.name), trainer.state.global_step, validation, test)


def write_card(recipe: Recipe, name: str, model, tokenizer, data, path: Path, location: Path, steps: int,
               validation: dict, test: dict, also: str = "") -> None:
    """The model card of a fine-tuned model (`location`: the folder it will be loaded from; `also`: a
    sentence more for its description)."""
    from llmkit.report import Origin, Scores, write_model_card

    settings = recipe.finetune
    base = f" of `{recipe.model.path}`" if recipe.model.path else ""
    adapter = settings.method != "full"
    write_model_card(path, name=name, model=model, tokenizer=tokenizer, location=location,
                     description=f"A {settings.task} model: {settings.method} fine-tuning{base} with llmkit."
                                 + ("" if settings.method == "full" else " This folder holds the adapter (PEFT); "
                                    "`llmkit generate/eval` load it onto its base.") + also,
                     origin=Origin(tasks.TASKS[settings.task].head, base=recipe.model.path,
                                   relation="adapter" if adapter else "finetune", training=(settings.source,),
                                   tags=("finetune", settings.task, *((settings.method, "peft") if adapter else ()))),
                     data=f"`{settings.source}`: {len(data.train):,} training / {len(data.validation):,} validation"
                          f" / {len(data.test):,} test examples",
                     steps=steps, samples=[],
                     scores=[Scores(settings.validation_source or settings.source, "validation", validation),
                             Scores(settings.test_source, "test", test)])


def show_results(console, run_dir: Path, settings, validation: dict, test: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{settings.task} ({settings.method})")
    table.add_column("metric")
    table.add_column("validation (best)", justify="right")
    table.add_column("test", justify="right")
    for name in shown_metrics(settings.task, validation, test):
        table.add_row(name, *score_cells(name, validation, test))
    console.print(table)
    console.print(f"[bold green]done[/]: model saved in {run_dir}"
                  + (f"; merged model in {run_dir / 'merged'}" if settings.merge else ""), highlight=False)


def shown_metrics(task: str, validation: dict, test: dict) -> list[str]:
    """The metrics of a task's results table: its headline, its selection metrics, its test baseline's."""
    scored_as = tasks.TASKS[tasks.scorer_of(task)]
    names = [k for k in dict.fromkeys((*scored_as.headline, *tasks.selection_metrics(task)))
             if k in validation or k in test]
    return names + [f"baseline_{name}" for name in scored_as.headline if f"baseline_{name}" in test]


def score_cells(name: str, *splits: dict) -> list[str]:
    return [f"{split[name]:.4f}" if name in split else "-" for split in splits]


# ---------------------------------------------------------------- several tasks at once (finetune.tasks)


def train_tasks(recipe: Recipe, folder, resume: bool, callbacks: list | None):
    """Multi-task fine-tuning: one model per [[finetune.tasks]] table, all sharing one encoder
    (llmkit.multitask), trained on batches of one task each; the checkpoint kept is the best by the mean of
    the tasks' validation scores. -> ({task: validation metrics} and "mean_score", {task: test metrics}, main)."""
    import transformers

    from llmkit import rundir
    from llmkit.callbacks import MetricsFile
    from llmkit.console import console
    from llmkit.devices import training_precision
    from llmkit.loading import build_task_model
    from llmkit.multitask import SharedEncoderModel, TaskRows, task_probabilities
    from llmkit.training import start_run, train_resumably, training_arguments

    work_dir = folder.work_dir
    # First: under a launcher this joins the processes, which task_tokenizer needs.
    args = training_arguments(recipe.train, recipe.distributed, recipe.run.seed, work_dir / rundir.CHECKPOINTS,
                              load_best_model_at_end=True, metric_for_best_model="mean_score",
                              greater_is_better=True, remove_unused_columns=False,
                              ddp_find_unused_parameters=True,  # a step trains one task's head, not the others
                              **({"save_steps": recipe.train.eval_every} if recipe.train.eval_every else {}))
    parts = {entry.label: recipe.finetune.for_task(entry) for entry in recipe.finetune.tasks}
    with console.status("reading data"):
        data = {name: task_data.load_task_data(settings, recipe.run.seed) for name, settings in parts.items()}
    with console.status("preparing the tokenizer"):
        tokenizer = task_tokenizer(recipe, [(settings, data[name]) for name, settings in parts.items()])
    transformers.set_seed(recipe.run.seed)
    recipes = {name: dataclasses.replace(recipe, finetune=settings) for name, settings in parts.items()}
    with console.status("loading the model"):
        model = SharedEncoderModel({name: build_task_model(recipes[name], tokenizer, data[name].labels)
                                    for name in parts})
    features = {name: encode_splits(recipes[name], tokenizer, data[name], model.task_models[name]) for name in parts}

    start_run(folder, recipe, args, resume, data_fingerprint(*data.values()))
    train_rows = TaskRows({name: rows for name, (rows, _) in features.items()})
    shares = task_probabilities(list(map(len, train_rows.lengths)), recipe.finetune.task_temperature)
    if args.process_index == 0:
        describe_tasks(console, model, parts, data, train_rows, training_precision(recipe.train.precision), shares)
    trainer = make_task_trainer(recipe, model, tokenizer, args, train_rows,
                                TaskRows({name: rows for name, (_, rows) in features.items()}), parts, data, shares,
                                callbacks=[MetricsFile(work_dir / "metrics.jsonl"), *(callbacks or [])])
    train_resumably(trainer, work_dir, resume, "finetune")
    validation, test = finish_tasks(recipe, trainer, tokenizer, parts, data, work_dir)
    return validation, test, args.process_index == 0


def describe_tasks(console, model, parts: dict, data: dict, train_rows, precision, shares: list[float]) -> None:
    shared = sum(p.numel() for p in model.encoder.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    console.print(f"{len(parts)} tasks, one {model.encoder.config.model_type} encoder ({shared / 1e6:.2f}M parameters "
                  f"shared, {heads:,} in the heads); {precision.name} ({precision.reason})", highlight=False)
    for (name, settings), rows, share in zip(parts.items(), train_rows.lengths, shares):
        console.print(f"  {name}: {settings.task} on {settings.source}, {len(rows):,} training / "
                      f"{len(data[name].validation):,} validation / {len(data[name].test):,} test examples, "
                      f"{share:.0%} of the batches", highlight=False)


def make_task_trainer(recipe: Recipe, model, tokenizer, args, train_rows, validation_rows, parts: dict,
                      data: dict, shares: list[float], callbacks):
    from transformers import PrinterCallback

    from llmkit.callbacks import Progress
    from llmkit.multitask import MultitaskTrainer, TaskCollator
    from llmkit.training import tokens_per_step

    lengths = [length for task in train_rows.lengths for length in task]
    trainer = MultitaskTrainer(
        model=model, args=args, train_dataset=train_rows, eval_dataset=validation_rows,
        data_collator=TaskCollator({name: task_data.collator(settings.task, tokenizer) for name, settings in parts.items()}),
        processing_class=tokenizer, callbacks=[Progress(tokens_per_step(sum(lengths) / len(lengths), args)),
                                               *callbacks], perplexity=False,
        score_validation=task_scorer(recipe, tokenizer, parts, data), probabilities=shares)
    trainer.remove_callback(PrinterCallback)  # Progress prints instead
    return trainer


def task_scorer(recipe: Recipe, tokenizer, parts: dict, data: dict):
    """SharedEncoderModel -> every task's validation scores as "<task>/<metric>", and "mean_score": the mean
    of each task's selection metric (its `metric`, else its usual one)."""

    def score(model) -> dict:
        scores, chosen = {}, []
        for name, settings in parts.items():
            task = task_data.eval_task(settings, settings.validation_source or settings.source)
            metrics = task_data.score(model.task_models[name], tokenizer, task, data[name].validation,
                                      recipe.train.eval_batch_size)
            scores |= {f"{name}/{key}": value for key, value in metrics.items()}
            chosen.append(metrics[(settings.metric or tasks.selection_metrics(settings.task)[0]).removeprefix("eval_")])
        return scores | {"mean_score": sum(chosen) / len(chosen)}

    return score


def finish_tasks(recipe: Recipe, trainer, tokenizer, parts: dict, data: dict, run_dir: Path) -> tuple[dict, dict]:
    """Each task's model (the shared encoder with its head) saved as <run>/<task>, a model that transformers
    and every llmkit command load; test scores per task; reports."""
    from llmkit import rundir
    from llmkit.callbacks import per_task
    from llmkit.console import console
    from llmkit.report import plot_losses
    from llmkit.training import trained_model

    location = rundir.run_dir_for(recipe.run.output_dir, recipe.run.name)
    best = best_evaluation(trainer)
    validation = {name: {} for name in parts} | {"mean_score": best.get("eval_mean_score")}
    for name, metric, value in per_task(best):
        validation[name][metric] = value
    test: dict = {}
    if trainer.is_world_process_zero():
        model = trained_model(trainer)
        model.eval()
        for name, settings in parts.items():
            task_recipe = dataclasses.replace(recipe, finetune=settings)
            model.save(name, run_dir / name)
            tokenizer.save_pretrained(str(run_dir / name))
            if data[name].test:
                with console.status(f"scoring {len(data[name].test):,} {name} test examples"):
                    test[name] = score_test(task_recipe, model.task_models[name], tokenizer, data[name])
            others = ", ".join(other for other in parts if other != name)
            write_card(task_recipe, f"{recipe.run.name}/{name}", model.task_models[name], tokenizer, data[name],
                       run_dir / name / "README.md", location / name, trainer.state.global_step, validation[name],
                       test.get(name, {}), also=f" Multi-task: its encoder was trained together with {others}.")
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", title=recipe.run.name)
        rundir.write_json(run_dir / "final_metrics.json",
                          {"step": trainer.state.global_step, "validation": validation, "test": test})
    return validation, test


def show_task_results(console, run_dir: Path, settings, validation: dict, test: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{len(settings.tasks)} tasks, one shared encoder")
    for column in ("task", "metric"):
        table.add_column(column)
    table.add_column("validation (best)", justify="right")
    table.add_column("test", justify="right")
    for entry in settings.tasks:
        scores, tested = validation[entry.label], test.get(entry.label, {})
        for name in shown_metrics(entry.task, scores, tested):
            table.add_row(entry.label, name, *score_cells(name, scores, tested))
    table.add_row("all", "mean score", *score_cells("mean_score", validation, {}))
    console.print(table)
    console.print(f"[bold green]done[/]: models saved in {run_dir}: "
                  + ", ".join(f"{entry.label}/" for entry in settings.tasks), highlight=False)
