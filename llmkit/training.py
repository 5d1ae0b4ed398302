"""Training, shared by every command that trains (pretrain, finetune, the recovery fine-tune of
quantize): TrainingArguments from the recipe, the Trainer and what llmkit adds to it (perplexity and loss
per character, class weights, distillation, validation scored as `llmkit eval` scores), the run's folder
from start to finish, and resuming.

    run folder (new runs are written aside, swapped in whole) -> start (recipe, provenance, once the input
    is checked) -> train, resumably (sealed checkpoints; Ctrl-C/SIGTERM saves one) -> the command finishes.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator

from transformers import Trainer

from llmkit import rundir
from llmkit.callbacks import Progress, SealCheckpoints, ShowSamples, StopOnInterrupt
from llmkit.console import console
from llmkit.devices import has_accelerator, training_precision
from llmkit.distributed import is_sharded, join_deepspeed_on_cpu, leave, shard_on_cpu
from llmkit.errors import Interrupted, LlmkitError, did_you_mean
from llmkit.recipe import load_recipe, recipe_to_dict, recipe_to_toml
from llmkit.settings import DistributedSettings, Recipe, TrainSettings


class LlmkitTrainer(Trainer):
    """Trainer that adds perplexity and loss per character to every evaluation it logs (language models),
    and for task models class weights, distillation from a teacher, and validation scored the way
    `llmkit eval` scores (accuracy, entity F1, EM/F1) at every evaluation."""

    def __init__(self, *args, tokens_per_char: float | None = None, perplexity: bool = True, class_weights=None,
                 teacher=None, distill=None, score_validation=None, fp32_outputs: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp32_outputs = fp32_outputs  # False: a mixed-precision forward's outputs stay in bf16/fp16
        self.tokens_per_char = tokens_per_char
        self.perplexity = perplexity  # False for classifiers: their loss is not a language model's
        self.class_weights, self.teacher, self.distill = class_weights, teacher, distill
        self.score_validation = score_validation
        self.validation_scores: dict = {}

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        shard_on_cpu(self)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # FSDP gathers, and DeepSpeed copies, each weight apart: tied weights (an output matrix that is the
        # embeddings) come as equal copies, which transformers would save twice. Their source alone is kept.
        if state_dict:
            tied = getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {}
            state_dict = {k: v for k, v in state_dict.items() if tied.get(k) not in state_dict}
        super()._save(output_dir, state_dict)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs and self.validation_scores:
            logs.update({f"eval_{k}": v for k, v in self.validation_scores.items() if isinstance(v, (int, float))})
            self.validation_scores = {}
        if "eval_loss" in logs and self.perplexity:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            if self.tokens_per_char:
                # total NLL / characters = mean token NLL x tokens per character, so that models
                # with different tokenizers compare.
                logs["eval_loss_per_char"] = logs["eval_loss"] * self.tokens_per_char
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.fp32_outputs:
            keep_outputs_in_autocast_dtype(model)
        return super().training_step(model, inputs, num_items_in_batch)

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


def keep_outputs_in_autocast_dtype(model) -> None:
    """Undo accelerate's copy of every output of a mixed-precision forward to fp32 (its ConvertOutputsToFp32
    wrapper; autocast stays). A language model computes its loss in fp32 inside the forward already, so the copy
    only converts the logits, batch x length x vocabulary, which nothing reads: on a CPU that copy and its
    allocation cost a quickstart step ~13% more CPU time (bench/pretrain_throughput.py, README). Under DDP the
    wrapper is on the module inside."""
    from types import MethodType

    from accelerate.utils.operations import ConvertOutputsToFp32

    module = getattr(model, "module", model)
    converter = getattr(getattr(module.forward, "__func__", None), "__wrapped__", None)
    if isinstance(converter, ConvertOutputsToFp32):
        module.forward = MethodType(converter.model_forward, module)


def trained_model(trainer):
    """The trained model as saved and as `llmkit eval` scores it: without the mixed-precision (autocast)
    wrapper that Trainer puts on its forward when training in bf16/fp16."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


def whole_model(trainer, saved_in: Path, auto_class):
    """The trained model whole, for the main process to generate from and describe once training is over:
    the model itself, or when its parameters are sharded across processes (distributed.is_sharded) the
    copy trainer.save_model gathered into `saved_in`, read back with `auto_class`."""
    if is_sharded(trainer):
        from transformers.integrations import unset_hf_deepspeed_config

        # Training is over: under ZeRO-3 transformers would load the model partitioned again, a step every
        # process must take together, where only this one reads it.
        unset_hf_deepspeed_config()
        return auto_class.from_pretrained(saved_in)
    return trained_model(trainer)


def collate_blocks(rows: list[dict]) -> dict:
    """Stack equal-length packed blocks (rows in torch format: no Python lists on the hot path);
    causal LM labels are the inputs (the model shifts them)."""
    import torch

    input_ids = torch.stack([row["input_ids"] for row in rows]).long()
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def training_arguments(train: TrainSettings, distributed: DistributedSettings, seed: int, output_dir: Path,
                       **overrides):
    """TrainingArguments from the recipe; `overrides` (TrainingArguments fields) win."""
    import torch
    from transformers import TrainingArguments

    strategy = {}
    if distributed.strategy == "fsdp":
        strategy = {"fsdp": distributed.fsdp, "fsdp_config": distributed.fsdp_config or None}
    elif distributed.strategy == "deepspeed":
        if not Path(distributed.deepspeed).is_file():
            raise LlmkitError(f"distributed.deepspeed: no such file: {distributed.deepspeed} (a DeepSpeed JSON "
                              f"config, relative to the recipe; llmkit ships recipes/deepspeed/zero2.json and zero3.json)")
        strategy = {"deepspeed": distributed.deepspeed}
    warmup = train.warmup_steps if train.warmup_steps < 1 else int(train.warmup_steps)
    schedule = "epoch" if train.eval_every == 0 else "steps"
    precision = training_precision(train.precision).name
    args = TrainingArguments(**{
        "output_dir": str(output_dir),
        "max_steps": -1 if train.epochs else train.max_steps,
        "num_train_epochs": train.epochs or 1.0,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.eval_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": train.min_lr_ratio},
        "warmup_steps": warmup,
        "weight_decay": train.weight_decay,
        "adam_beta2": train.adam_beta2,
        "max_grad_norm": train.max_grad_norm,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "eval_strategy": schedule,
        "eval_steps": train.eval_every or None,
        "save_strategy": schedule,
        "save_steps": train.save_every,
        "save_total_limit": train.keep_checkpoints,
        "logging_steps": train.log_every,
        "activation_checkpointing": train.gradient_checkpointing,
        "torch_compile": train.torch_compile,
        "dataloader_num_workers": train.dataloader_workers,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "use_cpu": not has_accelerator(),  # also what makes torchrun on CPUs a gloo DDP run
        "seed": seed,
        "data_seed": seed,
        "report_to": reporters(train.report_to),
        "disable_tqdm": True,  # llmkit shows its own progress
        **strategy,
        **overrides,
    })
    join_deepspeed_on_cpu(args)
    return args


def reporters(names: list[str]) -> list[str] | str:
    """train.report_to as TrainingArguments takes it, refused here (before anything is written) when an
    integration is unknown to transformers or not installed."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise LlmkitError(f"train.report_to: unknown integration {name!r}{did_you_mean(name, INTEGRATION_TO_CALLBACK)} "
                              f"(transformers has: {', '.join(INTEGRATION_TO_CALLBACK)})")
        if name not in get_available_reporting_integrations():
            raise LlmkitError(f"train.report_to: {name} is not installed: pip install {name}")
    return list(names) or "none"


def log_tensorboard_in(trainer, run_dir: Path) -> None:
    """TensorBoard events go to <run>/tensorboard (transformers' default folder is named after the host)."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(run_dir / "tensorboard")


def language_model_trainer(recipe: Recipe, model, tokenizer, args, train_blocks, eval_blocks, tokens_per_char,
                           callbacks: list):
    """The Trainer of a language model on packed blocks (pretraining, and the recovery fine-tune after
    pruning); `callbacks` come on top of progress display and samples."""
    from transformers import PrinterCallback

    objective = recipe.train.objective
    tokens_per_block = recipe.data.block_size
    if objective == "mlm+nsp" and len(train_blocks):
        tokens_per_block = sum(map(len, train_blocks["input_ids"])) / len(train_blocks)
    callbacks = [Progress(tokens_per_step(tokens_per_block, args)), *callbacks]
    nsp = {"compute_metrics": nsp_metrics, "preprocess_logits_for_metrics": nsp_predictions,
           "perplexity": False} if objective == "mlm+nsp" else {}
    trainer = LlmkitTrainer(model=model, args=args, train_dataset=train_blocks.with_format("torch"),
                            eval_dataset=eval_blocks.with_format("torch"),
                            data_collator=language_model_collator(recipe.train, tokenizer), callbacks=callbacks,
                            tokens_per_char=tokens_per_char,
                            fp32_outputs=False, **nsp)  # evaluation reads the loss, nsp_predictions upcasts
    trainer.remove_callback(PrinterCallback)  # Progress prints instead
    if objective == "causal" and not is_sharded(trainer):  # a sharded model generates on every process or none
        trainer.add_callback(ShowSamples(tokenizer, recipe.generate, recipe.run.seed))
    return trainer


def language_model_collator(train: TrainSettings, tokenizer):
    """Batches of packed blocks: masked at random for a masked LM (mlm+nsp: pairs of sentences, from
    llmkit.data.encode_pairs, padded here), stacked for a causal one."""
    from transformers import DataCollatorForLanguageModeling

    if train.objective in ("mlm", "mlm+nsp"):
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=train.mlm_probability)
    return collate_blocks


def tokens_per_step(tokens_per_example: float, args) -> int:
    """Tokens one optimizer step trains on, over every process: what progress shows as throughput."""
    return round(tokens_per_example * args.train_batch_size * args.gradient_accumulation_steps * args.world_size)


def nsp_predictions(logits, labels):
    """Per validation pair, what BertForPreTraining's evaluation keeps (the vocabulary-sized logits are
    not gathered): the next-sentence guess, and the masked tokens' summed loss and count."""
    import torch.nn.functional as F

    token_logits, next_logits = logits[0], logits[1]
    token_labels = labels[0]
    nll = F.cross_entropy(token_logits.float().transpose(1, 2), token_labels, ignore_index=-100, reduction="none")
    return next_logits.argmax(-1), nll.sum(-1), (token_labels != -100).sum(-1)


def nsp_metrics(prediction) -> dict:
    """eval_nsp_accuracy (next-sentence prediction on the validation pairs), eval_mlm_loss (per masked token)
    and its perplexity; eval_loss is the sum of both losses."""
    guesses, nll, masked = prediction.predictions
    mlm_loss = float(nll.sum() / max(masked.sum(), 1))
    return {"nsp_accuracy": float((guesses == prediction.label_ids[1]).mean()), "mlm_loss": mlm_loss,
            "mlm_perplexity": math.exp(min(mlm_loss, 50.0))}


# ---------------------------------------------------------------- a run from start to finish


@contextlib.contextmanager
def run_folder(recipe: Recipe, overwrite: bool, resume: bool, force: bool) -> Iterator[rundir.RunFolder]:
    """The run's folder (rundir.RunFolder: a new run is written aside and swapped in once complete); with
    `resume`, the recipe is first checked against the run's (`force`: accept keys that differ)."""
    run_dir = rundir.run_dir_for(recipe.run.output_dir, recipe.run.name)
    with rundir.RunFolder(run_dir, overwrite, resume) as folder:
        if resume:
            check_resume_recipe(recipe, run_dir, force)
        yield folder
    leave()  # once the run is in place: every process of a launch ends here, together


def start_run(folder: rundir.RunFolder, recipe: Recipe, args, resume: bool, data_fingerprint: str,
              tokenizer=None) -> None:
    """Once everything that can refuse the input has run: a new run's recipe and provenance (and tokenizer)
    are written by the main process while the others wait."""
    with args.main_process_first(desc="run directory"):
        if args.process_index == 0 and not resume:
            folder.start(recipe_to_toml(recipe),
                         rundir.provenance(data_fingerprint, args.world_size, recipe.run.record_host))
            if tokenizer is not None:
                tokenizer.save_pretrained(folder.work_dir)


def fit_to_budget(recipe: Recipe, model, batches, args, run_dir: Path, resume: bool) -> None:
    """train.max_minutes: lay the run out over the optimizer steps that fit (llmkit.budget), measured here
    on every rank with `batches` (the run's own), rank 0's count taken by all; a resumed run keeps the count
    its recipe.toml recorded (or train.max_steps, if that is now lower). The count becomes the recipe's train.max_steps (start_run records it) and the
    Trainer's (`args`)."""
    import torch
    from accelerate.utils import broadcast_object_list

    from llmkit.budget import seconds_per_step, steps_within

    train = recipe.train
    if resume:  # the recorded count, unless the recipe's ceiling is now lower
        steps = min(load_recipe(run_dir / "recipe.toml").train.max_steps, train.max_steps)
    else:
        with torch.random.fork_rng(devices=[]):  # the run's own random draws stay those of an unbudgeted run
            per_step = seconds_per_step(model, batches, train, training_precision(train.precision).dtype,
                                        str(args.device))
        steps = broadcast_object_list([steps_within(train.max_minutes, per_step, train.max_steps)])[0]
        if args.process_index == 0:
            console.print(f"time budget {train.max_minutes:g} min: {per_step:.3f} s per step measured here, "
                          f"{steps:,} steps (ceiling train.max_steps = {train.max_steps:,})", highlight=False)
    train.max_steps = args.max_steps = steps


def train_resumably(trainer, run_dir: Path, resume: bool, command: str) -> None:
    """Train, from the run's newest complete checkpoint when resuming; every checkpoint is sealed once
    written; Ctrl-C or SIGTERM saves a checkpoint and raises Interrupted, which says how to continue."""
    log_tensorboard_in(trainer, run_dir)
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
                  "train.keep_checkpoints", "train.eval_batch_size", "train.dataloader_workers", "train.report_to",
                  "run.output_dir", "run.record_host",
                  "generate.", "eval.", "quantize.")


def check_resume_recipe(recipe, run_dir: Path, force: bool) -> None:
    """Continuing a run with another recipe: the keys in SAFE_ON_RESUME may differ (reported); any other
    difference is refused unless forced, naming the keys."""
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
