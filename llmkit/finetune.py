"""`llmkit finetune`: adapt a model to a task (classification, token classification, extractive QA,
instruction tuning) by full tuning or PEFT (LoRA, DoRA, QLoRA, prompt and prefix tuning), with
optional knowledge distillation from a teacher.

setup (data, tokenizer, model: everything that can refuse bad input, before the disk is touched)
-> train (HF Trainer, best checkpoint by a validation metric) -> finish (test scores, model, card).

    from llmkit import load_recipe
    from llmkit.finetune import run

    result = run(load_recipe("classify"))
    print(result.test_metrics["accuracy"])
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.recipe import recipe_to_toml
from llmkit.settings import Recipe
from llmkit.training import LlmkitTrainer

TASK_HEADS = {  # fine-tuning task -> llmkit.models head
    "classification": "sequence-classification",
    "token-classification": "token-classification",
    "extractive-qa": "question-answering",
    "causal-lm": "causal-lm",
}
DEFAULT_METRIC = {"classification": "accuracy", "token-classification": "f1", "extractive-qa": "f1", "causal-lm": "loss"}
LABEL_NAMES = {"extractive-qa": ["start_positions", "end_positions"]}  # the others: ["labels"]
# A chat template for tokenizers without one (those llmkit trains): question, answer, end of answer.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}答：{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'user' %}问：{{ message['content'] }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}答：{% endif %}"
)


@dataclass
class FinetuneResult:
    run_dir: Path
    validation_metrics: dict  # of the kept (best) checkpoint
    test_metrics: dict  # finetune.test_source scored once at the end; {} without one


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False, callbacks: list | None = None,
        force: bool = False) -> FinetuneResult:
    """Fine-tune as the recipe says; `callbacks` (transformers TrainerCallback) join the Trainer's.
    `force`: resume although the recipe differs from the run's in keys that matter."""
    from llmkit import rundir
    from llmkit.console import console, quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft 0.21
    settings = recipe.finetune
    run_dir = rundir.run_dir_for(recipe.run.output_dir, recipe.run.name)
    if settings.method != "full" and not recipe.model.path:
        raise LlmkitError(f'finetune.method = "{settings.method}" trains an adapter on a base model: set model.path '
                          f'(a run, model directory or hub id), or use method = "full" to train from scratch')
    if settings.method != "full" and Path(recipe.model.path).resolve() == run_dir.resolve():
        raise LlmkitError(f"model.path {recipe.model.path} is this run's own folder: an adapter needs its base model "
                          f"to stay; set another run.name")
    with rundir.RunFolder(run_dir, overwrite, resume) as folder:
        validation, test, main = train(recipe, folder, resume, force, callbacks)
    if main:
        rundir.point_latest(run_dir)
        show_results(console, run_dir, settings, validation, test)
    return FinetuneResult(run_dir, validation, test)


def train(recipe: Recipe, folder, resume: bool, force: bool, callbacks: list | None):
    """Set up (everything that can refuse the input runs before the disk is touched), train into
    `folder.work_dir` (a rundir.RunFolder) and finish there;
    -> (validation metrics, test metrics, whether this is the main process)."""
    import transformers

    from llmkit import rundir
    from llmkit.adapters import apply_method
    from llmkit.builders import training_arguments, training_precision
    from llmkit.console import console
    from llmkit.task_data import load_task_data
    from llmkit.training import MetricsFile, check_resume_recipe, train_resumably

    run_dir, work_dir = folder.run_dir, folder.work_dir
    settings = recipe.finetune
    if resume:
        check_resume_recipe(recipe, run_dir, force)
    with console.status("reading data"):
        data = load_task_data(settings, recipe.run.seed)
    with console.status("preparing the tokenizer"):
        tokenizer = task_tokenizer(recipe, data)
    teacher = load_teacher(recipe, tokenizer, data.labels) if recipe.distill.teacher else None
    transformers.set_seed(recipe.run.seed)
    with console.status("loading the model"):
        model = apply_method(settings, build_task_model(recipe, tokenizer, data.labels))
    train_features, validation_features = encode_splits(recipe, tokenizer, data, model, console)

    metric = settings.metric or DEFAULT_METRIC[settings.task]
    args = training_arguments(recipe.train, recipe.distributed, recipe.run.seed, work_dir / rundir.CHECKPOINTS,
                              load_best_model_at_end=True, metric_for_best_model=metric,
                              greater_is_better=not metric.endswith("loss"), remove_unused_columns=False,
                              train_sampling_strategy="group_by_length",  # batches of similar lengths: little padding
                              label_names=LABEL_NAMES.get(settings.task, ["labels"]),
                              **({"save_steps": recipe.train.eval_every} if recipe.train.eval_every else {}))
    with args.main_process_first(desc="run directory"):
        if args.process_index == 0 and not resume:
            folder.start(recipe_to_toml(recipe), rundir.provenance(data_fingerprint(data), args.world_size))
    if args.process_index == 0:
        describe_setup(console, model, settings, data, train_features, training_precision(recipe.train.precision))

    trainer = make_trainer(recipe, model, tokenizer, args, train_features, validation_features, data, teacher,
                           callbacks=[MetricsFile(work_dir / "metrics.jsonl"), *(callbacks or [])])
    train_resumably(trainer, work_dir, resume, "finetune")
    validation, test = finish(recipe, trainer, tokenizer, data, work_dir)
    return validation, test, args.process_index == 0


# ---------------------------------------------------------------- setup


def task_tokenizer(recipe: Recipe, data):
    """The base model's tokenizer, or one trained on the training texts; padded, with a chat template
    for instruction tuning."""
    from llmkit.models import resolve_model
    from llmkit.tokenizer import load_tokenizer, train_tokenizer

    settings = recipe.finetune
    source = recipe.tokenizer.path or (resolve_model(recipe.model.path) if recipe.model.path else "")
    if source:
        tokenizer = load_tokenizer(source)
    else:
        objective = "mlm" if recipe.model.arch == "bert" else "causal"
        tokenizer = train_tokenizer(training_texts(settings, data.train), recipe.tokenizer, objective)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if settings.task == "causal-lm" and (settings.chat_template or not getattr(tokenizer, "chat_template", None)):
        tokenizer.chat_template = settings.chat_template or PLAIN_CHAT_TEMPLATE
    return tokenizer


def training_texts(settings, rows: list[dict]) -> list[str]:
    """The text of each training row, for a tokenizer trained from scratch."""
    if settings.task == "causal-lm":
        return [message["content"] for row in rows for message in row["messages"]]
    if settings.task == "token-classification":
        return ["".join(row[settings.tokens_column]) for row in rows]
    columns = {"classification": [settings.text_column, settings.text_pair_column],
               "extractive-qa": [settings.question_column, settings.context_column]}[settings.task]
    return [row[column] for row in rows for column in columns if column]


def head_options(settings, tokenizer, labels: list[str]) -> dict:
    options = {"pad_token_id": tokenizer.pad_token_id}
    if labels:
        options |= {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                    "label2id": {name: i for i, name in enumerate(labels)}}
    return options


def build_task_model(recipe: Recipe, tokenizer, labels: list[str], quantize: bool | None = None):
    """The base model with the task's head: loaded from model.path (4-bit NF4 for QLoRA), or built
    from [model] and the tokenizer."""
    import transformers

    from llmkit.adapters import quantization_config
    from llmkit.builders import model_config
    from llmkit.models import HEADS, first_line, pick_device, resolve_model, with_head

    settings = recipe.finetune
    head = TASK_HEADS[settings.task]
    auto = getattr(transformers, HEADS[head])
    options = head_options(settings, tokenizer, labels)
    if not recipe.model.path:
        config = model_config(recipe.model, tokenizer, "mlm" if recipe.model.arch == "bert" else "causal")
        config.update(options)
        return no_head_error(lambda: auto.from_config(config), config.model_type, head)
    source = resolve_model(recipe.model.path)
    quantize = settings.method == "qlora" if quantize is None else quantize
    if quantize:
        options |= {"quantization_config": quantization_config(source, auto), "device_map": {"": pick_device()}}
    try:
        model = no_head_error(lambda: with_head(auto, source, ignore_mismatched_sizes=bool(labels), **options),
                              source, head)
    except (OSError, ImportError) as error:
        raise LlmkitError(f"model.path {source}: cannot load it: {first_line(error)}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def no_head_error(load, what: str, head: str):
    """Run `load`; transformers' "Unrecognized configuration class" becomes a one-line LlmkitError."""
    try:
        return load()
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise LlmkitError(f"{what}: transformers has no {head} head for this architecture") from None
        raise LlmkitError(f"{what}: {str(error).splitlines()[0]}") from None


def load_teacher(recipe: Recipe, tokenizer, labels: list[str]):
    """The distillation teacher, frozen; it must read the student's tokens and predict its labels."""
    from llmkit.models import load_model

    if recipe.finetune.task == "extractive-qa":  # its outputs are start/end logits: no distillation loss for them
        raise LlmkitError("distill.teacher: distillation covers classification, token-classification and causal-lm, "
                          "not extractive-qa")
    teacher, teacher_tokenizer = load_model(recipe.distill.teacher, head=TASK_HEADS[recipe.finetune.task])
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


def encode_splits(recipe: Recipe, tokenizer, data, model, console):
    """Training and validation features as datasets; truncation and dropped examples are reported."""
    import datasets

    from llmkit.models import model_positions
    from llmkit.task_data import encode

    settings = recipe.finetune
    positions = model_positions(model.config)
    if positions and settings.max_length > positions:
        console.print(f"[yellow]finetune.max_length = {settings.max_length} exceeds the model's {positions} "
                      f"positions: using {positions}[/]")
        settings.max_length = positions
    splits = []
    for name, rows in (("training", data.train), ("validation", data.validation)):
        features = encode(settings, tokenizer, rows, data.labels)
        if features.truncated:
            console.print(f"[yellow]{features.truncated:,} of {len(rows):,} {name} examples are longer than "
                          f"finetune.max_length = {settings.max_length} tokens and were truncated[/]")
        if features.dropped:
            console.print(f"[yellow]{features.dropped:,} {name} examples were left out: their answer lies beyond "
                          f"the first {settings.max_length} tokens[/]")
        if not features.rows:
            raise LlmkitError(f"finetune.source {settings.source}: no usable {name} examples")
        splits.append(datasets.Dataset.from_list(features.rows))
    return splits


def data_fingerprint(data) -> str:
    from llmkit.data import fingerprint

    return fingerprint([json.dumps(row, ensure_ascii=False, sort_keys=True) for row in data.train + data.validation])


def describe_setup(console, model, settings, data, train_features, precision) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    labels = f", {len(data.labels)} labels" if data.labels else ""
    console.print(f"{settings.task} by {settings.method}: {model.config.model_type}, {total / 1e6:.2f}M parameters "
                  f"({trainable / total:.1%} trained); data: {len(train_features):,} training / "
                  f"{len(data.validation):,} validation / {len(data.test):,} test examples{labels}; "
                  f"{precision.name} ({precision.reason})", highlight=False)


# ---------------------------------------------------------------- training


class FinetuneTrainer(LlmkitTrainer):
    """Trainer with class weights, distillation from a teacher, and validation scored the way
    `llmkit eval` scores (accuracy, entity F1, EM/F1) at every evaluation."""

    def __init__(self, *args, class_weights=None, teacher=None, distill=None, score_validation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights, self.teacher, self.distill = class_weights, teacher, distill
        self.score_validation = score_validation
        self.validation_scores: dict = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.class_weights is None and self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        import torch.nn.functional as F

        outputs = model(**inputs)
        loss = outputs.loss
        if self.class_weights is not None:
            loss = F.cross_entropy(outputs.logits.float(), inputs["labels"],
                                   weight=self.class_weights.to(outputs.logits.device))
        if self.teacher is not None:
            loss = (1 - self.distill.alpha) * loss + self.distill.alpha * self.distillation_loss(inputs, outputs.logits)
        return (loss, outputs) if return_outputs else loss

    def distillation_loss(self, inputs, student_logits):
        """temperature^2 x KL(teacher || student) on softened outputs; for causal LMs and taggers over
        the tokens that carry a label (the response, the tagged first sub-tokens), for classifiers per
        example."""
        import torch
        import torch.nn.functional as F

        model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs).logits.float()
        student_logits = student_logits.float()
        if student_logits.dim() == 3:  # prompt tuning puts virtual tokens first
            student_logits = student_logits[:, -teacher_logits.shape[1]:]
        t = self.distill.temperature
        kl = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                      log_target=True, reduction="none").sum(-1)
        if kl.dim() == 2:
            labels = inputs["labels"][:, -kl.shape[1]:]  # taggers' labels move right with prompt tuning
            if self.perplexity:  # a causal LM (make_trainer sets perplexity for it only): i predicts i + 1
                kl, labels = kl[:, :-1], labels[:, 1:]
            kl = kl[labels != -100]
        return kl.mean() * t * t

    def evaluate(self, *args, **kwargs):
        if self.score_validation is not None:
            was_training = self.model.training
            self.model.eval()
            self.validation_scores = self.score_validation(self.model)
            self.model.train(was_training)
        return super().evaluate(*args, **kwargs)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "eval_loss" in logs and self.validation_scores:
            logs.update({f"eval_{k}": v for k, v in self.validation_scores.items() if isinstance(v, (int, float))})
            self.validation_scores = {}
        super().log(logs, start_time)


def make_trainer(recipe: Recipe, model, tokenizer, args, train_features, validation_features, data, teacher,
                 callbacks):
    from transformers import EarlyStoppingCallback, PrinterCallback

    from llmkit.task_data import collator
    from llmkit.training import Progress

    settings = recipe.finetune
    mean_tokens = sum(len(ids) for ids in train_features["input_ids"]) / len(train_features)
    tokens_per_step = mean_tokens * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    callbacks = [Progress(round(tokens_per_step)), *callbacks]
    if settings.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    trainer = FinetuneTrainer(
        model=model, args=args, train_dataset=train_features, eval_dataset=validation_features,
        data_collator=collator(settings.task, tokenizer,
                               settings.num_virtual_tokens if settings.method == "prompt-tuning" else 0),
        processing_class=tokenizer, callbacks=callbacks,
        perplexity=settings.task == "causal-lm", class_weights=class_weights(settings, data),
        teacher=teacher, distill=recipe.distill, score_validation=validation_scorer(recipe, tokenizer, data))
    trainer.remove_callback(PrinterCallback)  # Progress prints instead
    return trainer


def class_weights(settings, data):
    """"balanced": each class weighs total / (classes x its count), as in scikit-learn."""
    if settings.task != "classification" or settings.class_weights == "none":
        return None
    import torch

    counts = [0] * len(data.labels)
    for row in data.train:
        counts[data.label2id[str(row[settings.label_column])]] += 1
    return torch.tensor([len(data.train) / (len(counts) * max(count, 1)) for count in counts])


def validation_scorer(recipe: Recipe, tokenizer, data):
    """model -> validation metrics, scored like `llmkit eval` (causal LMs: the loss is the measure)."""
    from llmkit.evaluate import SCORERS
    from llmkit.task_data import eval_task

    settings = recipe.finetune
    if settings.task == "causal-lm":
        return None
    task = eval_task(settings, settings.validation_source or settings.source)
    return lambda model: SCORERS[task.kind](model, tokenizer, task, data.validation, recipe.train.eval_batch_size)


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

    merged = run_dir / "merged"
    merge_adapter(run_dir, merged, lambda: build_task_model(recipe, tokenizer, labels, quantize=False))
    tokenizer.save_pretrained(str(merged))


def score_test(recipe: Recipe, model, tokenizer, data) -> dict:
    """The held-out test split, scored once with the kept model, as `llmkit eval` scores it."""
    from llmkit.evaluate import SCORERS
    from llmkit.task_data import eval_task, generation_rows

    settings = recipe.finetune
    model.eval()
    if settings.task == "causal-lm":
        task, rows = generation_rows(settings, tokenizer, data.test)
    else:
        task, rows = eval_task(settings, settings.test_source), data.test
    return SCORERS[task.kind](model, tokenizer, task, rows, recipe.train.eval_batch_size)


def write_reports(recipe: Recipe, trainer, tokenizer, data, run_dir: Path, validation: dict, test: dict) -> None:
    from llmkit import rundir
    from llmkit.report import plot_losses, write_model_card

    settings = recipe.finetune
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", title=recipe.run.name)
    rundir.write_json(run_dir / "final_metrics.json",
                      {"step": trainer.state.global_step, "validation": validation, "test": test})
    loaders = {"classification": "AutoModelForSequenceClassification",
               "token-classification": "AutoModelForTokenClassification",
               "extractive-qa": "AutoModelForQuestionAnswering", "causal-lm": "AutoModelForCausalLM"}
    base = f" of `{recipe.model.path}`" if recipe.model.path else ""
    test_scores = {f"test {k}": v for k, v in test.items() if isinstance(v, float)}
    write_model_card(run_dir / "README.md", name=recipe.run.name, model=trainer.model, tokenizer=tokenizer,
                     description=f"A {settings.task} model: {settings.method} fine-tuning{base} with llmkit."
                                 + ("" if settings.method == "full" else " This folder holds the adapter (PEFT); "
                                    "`llmkit generate/eval` load it onto its base."),
                     loader=loaders[settings.task],
                     data=f"`{settings.source}`: {len(data.train):,} training / {len(data.validation):,} validation"
                          f" / {len(data.test):,} test examples",
                     steps=trainer.state.global_step,
                     metrics={**{f"validation {k}": v for k, v in validation.items()}, **test_scores}, samples=[])


def show_results(console, run_dir: Path, settings, validation: dict, test: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{settings.task} ({settings.method})")
    table.add_column("metric")
    table.add_column("validation (best)", justify="right")
    table.add_column("test", justify="right")
    names = [k for k in ("accuracy", "f1", "precision", "recall", "exact_match", "bleu", "chrf", "rouge_l", "loss")
             if k in validation or k in test]
    for name in names:
        table.add_row(name, *(f"{split[name]:.4f}" if name in split else "-" for split in (validation, test)))
    console.print(table)
    console.print(f"[bold green]done[/]: model saved in {run_dir}"
                  + (f"; merged model in {run_dir / 'merged'}" if settings.merge else ""), highlight=False)
