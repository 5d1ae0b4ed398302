"""`llmkit plan`: what a training run (pretrain or finetune) will take, before it starts.

    parameters (total, trainable; embeddings, layers, head) -> memory per device (weights, gradients, AdamW's two
    moments, activations: an estimate) with [distributed] sharding over the processes -> tokens per step and in all
    -> seconds per step measured on a few real training steps here -> the wall time this machine would take.

The model is built exactly as the command builds it (from [model], or loaded from model.path; PEFT applied), so
its counts are the run's. The tokenizer is the model's (model.path, tokenizer.path); a tokenizer still to be
trained is stood in for by one of tokenizer.vocab_size tokens, the most it may hold. The steps are timed on
random tokens of the recipe's shapes, so that no data is read for them.

    from llmkit import load_recipe
    from llmkit.plan import run

    plan = run(load_recipe("pretrain-zh-tiny"), command="pretrain", processes=8)
    print(plan["memory_per_device"]["total"], plan["time"]["estimated_seconds"])
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from llmkit import budget, tasks
from llmkit.errors import LlmkitError
from llmkit.settings import DistributedSettings, Recipe

OPTIMIZER_BYTES = 8  # AdamW: two fp32 moments per trainable parameter
LAYER = re.compile(r"\.(layers|layer|h|block)\.\d+\.")  # the repeated blocks of transformers' models
EMBEDDING = re.compile(r"embed|wte|wpe|shared")
# What FSDP (its TrainingArguments.fsdp options) and DeepSpeed ZeRO (its stage) divide among the processes.
FSDP_SHARDS = {"full_shard": ("weights", "gradients", "optimizer"), "hybrid_shard": ("weights", "gradients", "optimizer"),
               "shard_grad_op": ("gradients", "optimizer")}
ZERO_SHARDS = {0: (), 1: ("optimizer",), 2: ("gradients", "optimizer"), 3: ("weights", "gradients", "optimizer")}


def command_of(recipe_path: str) -> str:
    """Which command a recipe file is for: finetune when it (or a recipe it extends) has a [finetune] table,
    pretrain when it has no [eval] or [quantize] table either; a recipe for those commands is refused."""
    from llmkit.recipe import find_recipe, read_layers

    tables = set(read_layers(find_recipe(recipe_path), seen=()))
    if "finetune" in tables:
        return "finetune"
    for other in ("eval", "quantize"):
        if other in tables:
            raise LlmkitError(f"{recipe_path}: llmkit plan covers training recipes (pretrain, finetune); this one is "
                              f"for llmkit {other}")
    return "pretrain"


def run(recipe: Recipe, command: str, processes: int | None = None, measure_steps: int = 10) -> dict:
    """The plan of `recipe` for `command` ("pretrain" or "finetune") on `processes` processes (default:
    $WORLD_SIZE, else 1); `measure_steps` training steps are timed (0: none)."""
    import transformers

    from llmkit.console import console, quiet_libraries
    from llmkit.devices import pick_device, training_precision

    quiet_libraries()
    given = processes if processes is not None else os.environ.get("WORLD_SIZE", "1")
    world = int(given) if str(given).isdigit() else 0
    if world < 1:
        source = "--nproc" if processes is not None else "WORLD_SIZE"
        raise LlmkitError(f"{source} must be a whole number of processes, at least 1, got {given!r}")
    transformers.set_seed(recipe.run.seed)
    with console.status("building the model"):
        model, tokenizer, examples, vocabulary = (pretrain_model if command == "pretrain" else finetune_model)(recipe)
    precision = training_precision(recipe.train.precision)
    length = sequence_length(recipe, command, model)
    shards = sharded_parts(recipe.distributed, world)
    plan = {
        "recipe": recipe.run.name, "command": command, "vocabulary": vocabulary,
        "parameters": parameter_parts(model),
        "memory_per_device": memory(model, recipe, command, length, precision.name, shards, world),
        "processes": world, "strategy": recipe.distributed.strategy, "sharded": list(shards),
        "precision": {"name": precision.name, "reason": precision.reason},
        "tokens": tokens(recipe, length, world, examples),
        "budget_minutes": recipe.train.max_minutes,
    }
    if measure_steps:
        with console.status(f"timing {measure_steps} training steps"):
            seconds, peak = measure_step(recipe, command, model, tokenizer, length, measure_steps)
        if recipe.train.max_minutes:  # a time budget: the run takes the steps that fit, as timed here
            plan["tokens"] = tokens(recipe, length, world, examples,
                                    budget.steps_within(recipe.train.max_minutes, seconds, recipe.train.max_steps))
        steps = plan["tokens"]["steps"]
        plan["time"] = {"measured_steps": measure_steps, "warmup_steps": budget.WARMUP_STEPS, "device": pick_device(),
                        "seconds_per_step": float(f"{seconds:.6g}"),  # in significant digits: a fast step takes ~0.004 s
                        "estimated_seconds": None if steps is None else round(seconds * steps, 1),
                        "measured_peak_bytes": peak}
    return plan


# ---------------------------------------------------------------- the model


def pretrain_model(recipe: Recipe):
    """-> (model, tokenizer, training examples or None, how the vocabulary was found)."""
    from llmkit.loading import build_model
    from llmkit.settings import check_pretraining

    check_pretraining(recipe)
    if recipe.model.arch == "ngram" and not recipe.model.path:
        raise LlmkitError('model.arch = "ngram" is counted in one pass over the data, not trained: nothing to plan')
    tokenizer, vocabulary = plan_tokenizer(recipe, recipe.train.objective)
    return build_model(recipe, tokenizer), tokenizer, None, vocabulary


def finetune_model(recipe: Recipe):
    """-> (model with PEFT applied, tokenizer, training examples, how the vocabulary was found). The task's data
    is read: its labels size the head, its rows the steps of an epoch."""
    from llmkit import task_data
    from llmkit.adapters import apply_method
    from llmkit.loading import build_task_model, objective_of

    settings = recipe.finetune
    if settings.tasks:
        raise LlmkitError("finetune.tasks: llmkit plan covers single-task recipes; plan each task on its own "
                          "(--set finetune.tasks=[] --set finetune.task=... --set finetune.source=...)")
    if settings.method != "full" and not recipe.model.path:
        raise LlmkitError(f'finetune.method = "{settings.method}" trains an adapter on a base model: set model.path')
    data = task_data.load_task_data(settings, recipe.run.seed)
    tokenizer, vocabulary = plan_tokenizer(recipe, objective_of(recipe.model.arch, tasks.TASKS[settings.task].head))
    model = apply_method(settings, build_task_model(recipe, tokenizer, data.labels))
    return model, tokenizer, len(data.train), vocabulary


def plan_tokenizer(recipe: Recipe, objective: str):
    """The model's tokenizer (model.path, tokenizer.path), else a stand-in of tokenizer.vocab_size tokens with the
    objective's special tokens -> (tokenizer, how the vocabulary was found)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from llmkit.loading import resolve_model
    from llmkit.tokenizer import SPECIAL_TOKENS, load_tokenizer

    source = recipe.tokenizer.path or (resolve_model(recipe.model.path) if recipe.model.path else "")
    if source:
        tokenizer = load_tokenizer(str(source))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, f"{len(tokenizer):,} tokens (the tokenizer of {source})"
    special = SPECIAL_TOKENS["mlm" if objective == "mlm+nsp" else objective]
    names = list(dict.fromkeys(special.values()))
    size = recipe.tokenizer.vocab_size
    vocabulary = {name: i for i, name in enumerate(names + [f"t{i}" for i in range(size - len(names))])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, special["unk_token"])),
                                        **special)
    return tokenizer, (f"{size:,} tokens (tokenizer.vocab_size: the tokenizer is trained at the start of the run, "
                       f"on the data, and may keep fewer)")


def sequence_length(recipe: Recipe, command: str, model) -> int:
    """Tokens per example: the block (pretrain), or finetune.max_length within the model's positions (an upper
    bound: batches are padded to their longest example)."""
    from llmkit.loading import model_positions

    if command == "pretrain":
        return recipe.data.block_size
    positions = model_positions(model.config)
    return min(recipe.finetune.max_length, positions) if positions else recipe.finetune.max_length


# ---------------------------------------------------------------- counts


def parameter_parts(model) -> dict:
    """Total and trainable parameters, and per part: embeddings (input, positions, a tied output), the repeated
    layers, and the head with the rest (final norm, output layer, pooler, task head)."""
    parts = {name: {"total": 0, "trainable": 0} for name in ("embeddings", "layers", "head", "all")}
    for name, parameter in model.named_parameters():  # each tensor once: tied weights count once
        part = "layers" if LAYER.search(name) else "embeddings" if EMBEDDING.search(name) else "head"
        for key in (part, "all"):
            parts[key]["total"] += parameter.numel()
            parts[key]["trainable"] += parameter.numel() if parameter.requires_grad else 0
    return parts


def sharded_parts(distributed: DistributedSettings, world: int) -> tuple[str, ...]:
    """What the strategy divides among `world` processes (weights, gradients, optimizer); DDP divides nothing."""
    if world == 1 or distributed.strategy == "ddp":
        return ()
    if distributed.strategy == "fsdp":
        option = next((o for o in FSDP_SHARDS if o in distributed.fsdp.split()), "full_shard")
        return FSDP_SHARDS[option]
    try:
        stage = json.loads(Path(distributed.deepspeed).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0)
    except (OSError, ValueError, AttributeError) as error:
        raise LlmkitError(f"distributed.deepspeed {distributed.deepspeed}: cannot read its ZeRO stage: {error}") from None
    if stage not in ZERO_SHARDS:
        raise LlmkitError(f"distributed.deepspeed {distributed.deepspeed}: zero_optimization.stage must be 0 to 3, "
                          f"got {stage!r}")
    return ZERO_SHARDS[stage]


def memory(model, recipe: Recipe, command: str, length: int, precision: str, shards: tuple[str, ...],
           world: int) -> dict:
    """Bytes per device. Weights and gradients in the dtype they are held in (mixed precision keeps fp32
    weights, autocast computes in bf16/fp16); AdamW's moments: 8 bytes per trainable parameter."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    held = {"weights": sum(p.numel() * p.element_size() for p in model.parameters()),
            "gradients": sum(p.numel() * p.element_size() for p in trainable),
            "optimizer": OPTIMIZER_BYTES * sum(p.numel() for p in trainable)}
    rows = {part: math.ceil(size / world) if part in shards else size for part, size in held.items()}
    rows["activations"] = activation_estimate(model.config, recipe, command, length, precision)
    rows["total"] = sum(rows.values())
    return rows


def activation_estimate(config, recipe: Recipe, command: str, length: int, precision: str) -> int:
    """Bytes the backward pass keeps per micro-batch, estimated: per layer s·b·h·(34 + 5·a·s/h) bytes in 16 bits
    (Korthikanti et al. 2022, "Reducing activation recomputation in large transformer models"), twice that in
    fp32, without the 5·a·s/h of the attention scores where SDPA or flash attention computes them (and keeps
    none); with gradient checkpointing each layer keeps its input only, and one layer is recomputed at a time. A
    language model head adds its vocabulary logits, plus their fp32 copy and log-softmax in the loss. For a
    vision-language model, its language model's (the vision tower's are not counted)."""
    config = config.get_text_config()
    batch, hidden, heads = recipe.train.batch_size, config.hidden_size, config.num_attention_heads
    layers = config.num_hidden_layers + getattr(config, "num_decoder_layers", 0)
    scale = 2 if precision == "fp32" else 1
    scores = 0 if fused_attention(config) else 5 * heads * length / hidden
    per_layer = length * batch * hidden * (34 + scores) * scale
    if recipe.train.gradient_checkpointing:
        kept = layers * length * batch * hidden * 2 * scale + per_layer
    else:
        kept = layers * per_layer
    head = tasks.TASKS[recipe.finetune.task].head if command == "finetune" else "causal-lm"
    if head in ("causal-lm", "masked-lm", "seq2seq-lm", "image-text-to-text"):
        kept += batch * length * config.vocab_size * (2 * 2 * scale + 8)
    return int(kept)


def fused_attention(config) -> bool:
    """Whether attention runs in one kernel that keeps no score matrix for the backward pass."""
    return getattr(config, "_attn_implementation", "eager") in ("sdpa", "flash_attention_2", "flash_attention_3")


def tokens(recipe: Recipe, length: int, world: int, examples: int | None, steps: int | None = None) -> dict:
    """Tokens per optimizer step over every process, the steps (`steps`, else the recipe's), and the tokens in
    all (None: unknown before the data is packed, for a pretraining run counted in epochs)."""
    train = recipe.train
    sequences = train.batch_size * train.gradient_accumulation * world
    steps = steps or train.max_steps
    if train.epochs:
        steps = None if examples is None else math.ceil(train.epochs * math.ceil(examples / sequences))
    per_step = sequences * length
    return {"per_step": per_step, "steps": steps, "in_all": None if steps is None else per_step * steps,
            "sequences_per_step": sequences, "tokens_per_sequence": length, "micro_batch": train.batch_size}


# ---------------------------------------------------------------- timing


def measure_step(recipe: Recipe, command: str, model, tokenizer, length: int, steps: int) -> tuple[float, int | None]:
    """Seconds per optimizer step, timed as a time budget times them (llmkit.budget: a copy of the model, the
    recipe's batch, accumulation and precision), on random tokens; and on a CUDA GPU the peak of the memory
    torch allocated meanwhile (None elsewhere: CPUs report no such figure)."""
    import torch
    from transformers import default_data_collator

    from llmkit.budget import seconds_per_step
    from llmkit.devices import pick_device, training_precision
    from llmkit.training import language_model_collator

    rows = random_rows(recipe, command, model, tokenizer, length)
    examples = [{key: torch.tensor(value) for key, value in zip(rows, values)} for values in zip(*rows.values())]
    # pretraining batches as the run makes them (masked for a masked LM); the others stacked as they are
    collate = language_model_collator(recipe.train, tokenizer) if command == "pretrain" else default_data_collator
    size = recipe.train.batch_size
    batches = [collate(examples[i: i + size]) for i in range(0, len(examples), size)]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = seconds_per_step(model, batches, recipe.train, training_precision(recipe.train.precision).dtype,
                               pick_device(), steps)
    return seconds, torch.cuda.max_memory_allocated() if cuda else None


def random_rows(recipe: Recipe, command: str, model, tokenizer, length: int) -> dict:
    """Columns of random examples shaped as the command's batches: input ids and the targets of the head."""
    import torch

    count = recipe.train.batch_size * recipe.train.gradient_accumulation * (budget.WARMUP_STEPS + 2)
    generator = torch.Generator().manual_seed(recipe.run.seed)
    ids = torch.randint(0, len(tokenizer), (count, length), generator=generator)
    if command == "pretrain":  # masked objectives: the collator masks the inputs and makes the labels
        objective = recipe.train.objective
        if objective == "mlm+nsp":
            return {"input_ids": ids.tolist(), "token_type_ids": torch.zeros_like(ids).tolist(),
                    "next_sentence_label": torch.randint(0, 2, (count,), generator=generator).tolist()}
        return {"input_ids": ids.tolist(), **({"labels": ids.tolist()} if objective == "causal" else {})}
    head = tasks.TASKS[recipe.finetune.task].head
    columns = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    labels = getattr(model.config, "num_labels", 2)
    if head == "sequence-classification":
        columns["labels"] = torch.randint(0, labels, (count,), generator=generator).tolist()
    elif head == "token-classification":
        columns["labels"] = torch.randint(0, labels, (count, length), generator=generator).tolist()
    elif head == "question-answering":
        for target in ("start_positions", "end_positions"):
            columns[target] = torch.randint(0, length, (count,), generator=generator).tolist()
    else:  # causal-lm (instruction tuning) and seq2seq-lm: a token to predict at every position
        columns["labels"] = ids.tolist()
    return columns


# ---------------------------------------------------------------- the report


def show(plan: dict, console) -> None:
    """The plan as one table: what, how much, and where the figure comes from."""
    from rich.table import Table

    table = Table(title=f"llmkit plan: {plan['recipe']} ({plan['command']})")
    for column, justify in (("what", "left"), ("how much", "right"), ("note", "left")):
        table.add_column(column, justify=justify)
    parts = plan["parameters"]
    for name, label in (("all", "parameters"), ("embeddings", "  embeddings"), ("layers", "  layers"),
                        ("head", "  head and the rest")):
        part = parts[name]
        share = f"{part['trainable'] / part['total']:.1%} trained" if part["total"] else ""
        table.add_row(label, f"{part['total']:,}", f"{part['trainable']:,} trainable ({share})" if share else "")
    table.add_row("vocabulary", "", plan["vocabulary"])
    memory_rows = plan["memory_per_device"]
    sharded = ", ".join(plan["sharded"]) or "nothing"
    where = f"{plan['processes']} process(es), {plan['strategy']}: {sharded} divided among them"
    notes = {"weights": where, "gradients": "trainable parameters only",
             "optimizer": "AdamW: 2 fp32 moments per trainable parameter",
             "activations": f"an estimate, per micro-batch of {plan['tokens']['tokens_per_sequence']} tokens x "
                            f"{plan['tokens']['micro_batch']} ({plan['precision']['name']})",
             "total": "per device, before the allocator's and the framework's overhead"}
    for name, size in memory_rows.items():
        table.add_row(f"memory: {name}", megabytes(size), notes[name])
    tokens_row = plan["tokens"]
    table.add_row("tokens per step", f"{tokens_row['per_step']:,}",
                  f"{tokens_row['sequences_per_step']:,} sequences x {tokens_row['tokens_per_sequence']:,} tokens"
                  + (" (at most: batches are padded to their longest example)" if plan["command"] == "finetune" else ""))
    steps = tokens_row["steps"]
    budget_note = (f"what fits in train.max_minutes = {plan['budget_minutes']:g} at the time per step measured here"
                   if plan.get("budget_minutes") else "")
    table.add_row("steps", "-" if steps is None else f"{steps:,}",
                  "train.epochs: counted once the data is packed" if steps is None else budget_note)
    table.add_row("tokens in all", "-" if tokens_row["in_all"] is None else f"{tokens_row['in_all']:,}", "")
    timing = plan.get("time")
    if timing:
        table.add_row("seconds per step", f"{timing['seconds_per_step']:.3g}",
                      f"measured here: {timing['measured_steps']} steps after {timing['warmup_steps']} warm-up, "
                      f"{timing['device']}, {plan['precision']['name']}, one process, random tokens (the Trainer "
                      f"adds a few percent)")
        if timing["measured_peak_bytes"] is not None:
            table.add_row("memory: measured peak", megabytes(timing["measured_peak_bytes"]),
                          "torch.cuda.max_memory_allocated over those steps, one process (no sharding)")
        estimate = timing["estimated_seconds"]
        table.add_row("estimated wall time", "-" if estimate is None else duration(estimate),
                      "training steps only, on this machine (evaluation, saving and data preparation not counted)")
    console.print(table)


def megabytes(size: int) -> str:
    return f"{size / 1e9:,.2f} GB" if size >= 1e9 else f"{size / 1e6:,.2f} MB"


def duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} m" if hours else f"{rest // 60} m {rest % 60:02d} s"
