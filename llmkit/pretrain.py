"""`llmkit pretrain`: train a tokenizer and a causal or masked language model from scratch, or
continue pretraining an existing one; or count a character n-gram model (model.arch = "ngram").

setup (data, tokenizer, model: everything that can refuse bad input, before the disk is touched)
-> train (HF Trainer) -> finish (final evaluation, model, card, curve, samples, runs/latest, and for a
causal model the n-gram baseline on the same splits).

    from llmkit import load_recipe
    from llmkit.pretrain import run

    result = run(load_recipe("pretrain-zh-tiny", ["train.max_steps=100"]), overwrite=True)
    print(result.metrics["eval_loss_per_char"])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.settings import Recipe, check_pretraining


BASELINE_MAX_CHARS = 10_000_000  # the n-gram baseline counts at most this many training characters (it holds them all)


@dataclass
class PretrainResult:
    run_dir: Path
    metrics: dict  # final evaluation: eval_loss, eval_perplexity, eval_loss_per_char and baseline_ngram_* (causal)
    samples: list[str]


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False, callbacks: list | None = None,
        force: bool = False) -> PretrainResult:
    """Pretrain as the recipe says; `callbacks` (transformers TrainerCallback) are added to the Trainer's.
    `force`: resume although the recipe differs from the run's in keys that matter."""
    from llmkit import rundir
    from llmkit.console import quiet_libraries, stdout
    from llmkit.training import run_folder

    quiet_libraries()
    check_pretraining(recipe)
    ngram = recipe.model.arch == "ngram"
    if ngram and resume:
        raise LlmkitError('--resume: model.arch = "ngram" is counted in one pass; there is nothing to resume')
    with run_folder(recipe, overwrite, resume, force) as folder:
        if ngram:
            metrics, samples, main = count_ngram(recipe, folder)
        else:
            metrics, samples, main = train(recipe, folder, resume, callbacks)
    if main:
        if ngram:
            stdout.print(f"[bold green]done[/]: {recipe.model.ngram_order}-gram model saved in {folder.run_dir}; "
                         f"validation {metrics['eval_loss_per_char']:.4f} nats/char", highlight=False)
        else:
            rundir.point_latest(folder.run_dir, "causal-lm" if recipe.train.objective == "causal" else "masked-lm")
            stdout.print(f"[bold green]done[/]: model saved in {folder.run_dir}", highlight=False)
        for text in samples:
            stdout.print(f"  {text}", highlight=False)
        if "baseline_ngram_loss_per_char" in metrics:
            stdout.print(f"baseline: a {metrics['baseline_ngram_order']}-gram (absolute discounting) scores "
                         f"{metrics['baseline_ngram_loss_per_char']:.4f} nats/char on this validation split; "
                         f"this model {metrics['eval_loss_per_char']:.4f}", highlight=False)
    return PretrainResult(folder.run_dir, metrics, samples)


def train(recipe: Recipe, folder, resume: bool, callbacks: list | None):
    """Set up (everything that can refuse the input runs before the disk is touched), train into
    `folder.work_dir` (a rundir.RunFolder) and finish there;
    -> (final metrics, samples, whether this is the main process)."""
    import transformers
    from torch.utils.data import DataLoader

    from llmkit import rundir
    from llmkit.callbacks import MetricsFile
    from llmkit.console import console
    from llmkit.data import (blocks_cache, encode_pairs, load_text_splits, pack_blocks, sentence_pairs, texts,
                             training_blocks)
    from llmkit.devices import training_precision
    from llmkit.distributed import once_for_all
    from llmkit.loading import build_model
    from llmkit.tokenizer import load_tokenizer, train_tokenizer
    from llmkit.training import (fit_to_budget, language_model_collator, language_model_trainer, start_run,
                                 train_resumably, training_arguments)

    work_dir = folder.work_dir
    objective = recipe.train.objective
    # First: under a launcher this joins the processes, which the tokenizer below needs.
    # A language model uses every parameter at every step: DDP need not search for unused ones (Trainer's
    # default makes it walk the autograd graph again at every step, and warn that it found none).
    args = training_arguments(recipe.train, recipe.distributed, recipe.run.seed, work_dir / rundir.CHECKPOINTS,
                              ddp_find_unused_parameters=False)
    with args.main_process_first(desc="reading data"), console.status("reading data"):
        splits = load_text_splits(recipe.data)  # files are copied into Arrow once, by the main process
    with console.status("preparing the tokenizer"):
        tokenizer_source = folder.run_dir if resume else (recipe.tokenizer.path or recipe.model.path)
        if tokenizer_source:
            tokenizer = load_tokenizer(str(tokenizer_source))
        else:  # trained once, on the main process: every process must use the very same vocabulary
            sample = texts(splits.train, recipe.tokenizer.train_documents)
            tokenizer = once_for_all(lambda: train_tokenizer(list(sample), recipe.tokenizer, objective))
    transformers.set_seed(recipe.run.seed)
    model = build_model(recipe, tokenizer)

    if objective == "mlm+nsp":  # pairs of sentences, each pair at most one block long
        with console.status("pairing sentences"):
            train_blocks = encode_pairs(sentence_pairs(list(texts(splits.train)), recipe.run.seed), tokenizer,
                                        recipe.data.block_size)
            eval_blocks = encode_pairs(sentence_pairs(list(texts(splits.validation)), recipe.run.seed + 1), tokenizer,
                                       recipe.data.block_size)
        if len(train_blocks) == 0 or len(eval_blocks) == 0:
            raise LlmkitError(f"train.objective = \"mlm+nsp\" needs documents of two or more sentences in both "
                              f"splits; the {'training' if len(train_blocks) == 0 else 'validation'} split has none")
    else:
        with args.main_process_first(desc="tokenizing"), console.status("tokenizing and packing"):
            train_blocks = training_blocks(splits, tokenizer, recipe.data.block_size, recipe.run.seed)
            eval_blocks, eval_tokens = pack_blocks(splits.validation, tokenizer, recipe.data.block_size,
                                                   blocks_cache())
        if len(eval_blocks) == 0:
            raise LlmkitError(f"the validation split ({eval_tokens} tokens) is shorter than one block of "
                              f"data.block_size = {recipe.data.block_size}; lower it or hold out more text")
    if recipe.train.max_minutes:
        batches = DataLoader(train_blocks.with_format("torch"), batch_size=args.per_device_train_batch_size,
                             collate_fn=language_model_collator(recipe.train, tokenizer))
        fit_to_budget(recipe, model, batches, args, work_dir, resume)
    start_run(folder, recipe, args, resume, splits.fingerprint, tokenizer)
    if args.process_index == 0:
        describe_setup(console, model, tokenizer, train_blocks, eval_blocks, args,
                       training_precision(recipe.train.precision))

    tokens_per_char = eval_tokens / splits.validation_chars if objective == "causal" else None
    trainer = language_model_trainer(recipe, model, tokenizer, args, train_blocks, eval_blocks, tokens_per_char,
                                     callbacks=[MetricsFile(work_dir / "metrics.jsonl"), *(callbacks or [])])
    train_resumably(trainer, work_dir, resume, "pretrain")
    metrics, samples = finish(recipe, trainer, tokenizer, splits, work_dir)
    return metrics, samples, args.process_index == 0


def describe_setup(console, model, tokenizer, train_blocks, eval_blocks, args, precision) -> None:
    from datasets import IterableDataset

    from llmkit.distributed import full_size

    parameters = sum(full_size(p) for p in model.parameters())
    unit = "sentence pairs" if "next_sentence_label" in train_blocks.column_names else "blocks"
    training = "streamed" if isinstance(train_blocks, IterableDataset) else f"{len(train_blocks):,}"
    console.print(f"model: {model.config.model_type}, {parameters / 1e6:.2f}M parameters, vocabulary {len(tokenizer):,}; "
                  f"data: {training} training / {len(eval_blocks):,} validation {unit}; "
                  f"{args.world_size} process(es), {precision.name} ({precision.reason})", highlight=False)


def finish(recipe: Recipe, trainer, tokenizer, splits, run_dir: Path) -> tuple[dict, list[str]]:
    from llmkit import rundir
    from llmkit.generation import continue_prompts
    from llmkit.report import Origin, Scores, plot_losses, write_model_card
    from llmkit.data import dataset_chars
    from llmkit.loading import auto_model_class
    from llmkit.training import whole_model

    evaluations = [row for row in trainer.state.log_history if "eval_loss" in row]
    if evaluations and evaluations[-1]["step"] == trainer.state.global_step:
        metrics = {k: v for k, v in evaluations[-1].items() if k.startswith("eval_")}
    else:
        metrics = trainer.evaluate()
    trainer.save_model(str(run_dir))
    samples: list[str] = []
    if trainer.is_world_process_zero():
        model = whole_model(trainer, run_dir, auto_model_class(recipe.train.objective))
        if recipe.train.objective == "causal" and recipe.generate.prompts:
            samples = continue_prompts(model, tokenizer, recipe.generate.prompts, recipe.generate, recipe.run.seed)
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", title=recipe.run.name)
        causal = recipe.train.objective == "causal"
        train_chars = None if splits.streamed else dataset_chars(splits.train)
        baseline = ngram_baseline(recipe, splits, train_chars) if causal else {}
        kind = {"causal": "causal", "mlm": "masked", "mlm+nsp": "masked"}[recipe.train.objective]
        with_nsp = " with next-sentence prediction" if recipe.train.objective == "mlm+nsp" else ""
        write_model_card(run_dir / "README.md", name=recipe.run.name, model=model, tokenizer=tokenizer,
                         location=rundir.run_dir_for(recipe.run.output_dir, recipe.run.name),
                         description=f"A {model.config.model_type} {kind} language model{with_nsp} pretrained "
                                     f"with llmkit.",
                         origin=Origin("causal-lm" if causal else "masked-lm", base=recipe.model.path,
                                       relation="finetune", training=(recipe.data.source,), tags=("pretrain",)),
                         data=f"`{recipe.data.source}`: {'streamed' if train_chars is None else f'{train_chars:,}'} "
                              f"training / {splits.validation_chars:,} validation characters",
                         steps=trainer.state.global_step, samples=samples,
                         scores=[Scores(recipe.data.validation_source or recipe.data.source, "validation", metrics)],
                         rows=baseline_rows(baseline))
        metrics = {**metrics, **baseline}
        rundir.write_json(run_dir / "final_metrics.json", {"step": trainer.state.global_step, **metrics})
    return metrics, samples


# ---------------------------------------------------------------- the classic model: character n-grams


def ngram_baseline(recipe: Recipe, splits, train_chars: int | None) -> dict:
    """The n-gram model of order model.ngram_order counted on the same training split and scored on the same
    validation split, in loss per char like the model's (llmkit.ngram.NgramModel.score); none for a streamed
    corpus or one of more than BASELINE_MAX_CHARS training characters (`train_chars`: the n-gram model holds
    all of its text)."""
    from llmkit.console import console
    from llmkit.data import texts
    from llmkit.ngram import NgramModel

    if train_chars is None or train_chars > BASELINE_MAX_CHARS:
        return {}
    order = recipe.model.ngram_order
    with console.status(f"baseline: counting {order}-grams"):
        scored = NgramModel.train(list(texts(splits.train)), order).score(list(texts(splits.validation)))
    return {"baseline_ngram_order": order, "baseline_ngram_loss_per_char": scored["loss_per_char"]}


def baseline_rows(baseline: dict) -> dict:
    if not baseline:
        return {}
    return {f"baseline: {baseline['baseline_ngram_order']}-gram (absolute discounting) validation loss_per_char":
            f"{baseline['baseline_ngram_loss_per_char']:.4f}"}


def count_ngram(recipe: Recipe, folder):
    """model.arch = "ngram": count the character n-grams of the training split, score the validation split,
    and save the model (llmkit.ngram.FILE), recipe, provenance, final metrics, card and samples in the run
    folder; -> (final metrics, samples, whether this is the main process). No Trainer, one process."""
    from llmkit import rundir
    from llmkit.console import console
    from llmkit.data import dataset_chars, load_text_splits, texts
    from llmkit.ngram import FILE, NgramModel
    from llmkit.recipe import recipe_to_toml
    from llmkit.report import write_ngram_card

    if not folder.main:  # another rank of a distributed launch: the n-gram is counted once
        return {}, [], False
    order = recipe.model.ngram_order
    with console.status("reading data"):
        splits = load_text_splits(recipe.data)
    with console.status(f"counting {order}-grams"):
        model = NgramModel.train(list(texts(splits.train)), order)
    train_chars = dataset_chars(splits.train)
    console.print(f"model: ngram, {sum(map(len, model.counts)) / 1e6:.2f}M parameters (counts of 1- to {order}-grams), "
                  f"vocabulary {len(model.vocabulary):,} symbols; data: {train_chars:,} training / "
                  f"{splits.validation_chars:,} validation characters", highlight=False)
    with console.status("scoring the validation split"):
        scored = model.score(list(texts(splits.validation)))
    folder.start(recipe_to_toml(recipe), rundir.provenance(splits.fingerprint, 1, recipe.run.record_host))
    work_dir = folder.work_dir
    model.save(work_dir / FILE)
    samples = [model.sample(prompt, recipe.generate.max_new_tokens, recipe.run.seed) for prompt in recipe.generate.prompts]
    metrics = {"order": order, "eval_loss_per_char": scored["loss_per_char"], "eval_chars": scored["chars"],
               "eval_unknown_chars": scored["unknown"], "discounts": model.discounts}
    write_ngram_card(work_dir / "README.md", name=recipe.run.name, model=model,
                     data=f"`{recipe.data.source}`: {train_chars:,} training / {splits.validation_chars:,} "
                          f"validation characters", loss_per_char=scored["loss_per_char"], samples=samples,
                     run_dir=folder.run_dir)
    rundir.write_json(work_dir / "final_metrics.json", metrics)
    return metrics, samples, True
