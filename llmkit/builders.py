"""Recipe settings -> Hugging Face objects: model configs and models, TrainingArguments.

Small pure functions, so that each translation can be tested on its own.
"""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.settings import DistributedSettings, ModelSettings, Recipe, TrainSettings


def model_config(settings: ModelSettings, tokenizer, objective: str):
    """A transformers config for a model built from scratch, sized by the recipe."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    vocab_size = len(tokenizer)
    if settings.arch == "llama":
        # SwiGLU has three matrices: 8/3 x d_model keeps the parameter count of a 4 x d_model MLP.
        d_ff = settings.d_ff or 64 * round(8 * settings.d_model / 3 / 64) or 4 * settings.d_model
        return LlamaConfig(vocab_size=vocab_size, hidden_size=settings.d_model, intermediate_size=d_ff,
                           num_hidden_layers=settings.n_layer, num_attention_heads=settings.n_head,
                           num_key_value_heads=settings.n_kv_head or settings.n_head,
                           max_position_embeddings=settings.max_positions, attention_dropout=settings.dropout,
                           tie_word_embeddings=settings.tie_embeddings,
                           rope_parameters={"rope_type": "default", "rope_theta": settings.rope_theta}, **ids)
    d_ff = settings.d_ff or 4 * settings.d_model
    if settings.arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=settings.d_model, n_layer=settings.n_layer,
                          n_head=settings.n_head, n_inner=d_ff, n_positions=settings.max_positions,
                          resid_pdrop=settings.dropout, embd_pdrop=settings.dropout, attn_pdrop=settings.dropout,
                          tie_word_embeddings=settings.tie_embeddings, **ids)
    if objective != "mlm":
        raise LlmkitError(f'model.arch = "{settings.arch}" needs train.objective = "mlm"')
    return BertConfig(vocab_size=vocab_size, hidden_size=settings.d_model, num_hidden_layers=settings.n_layer,
                      num_attention_heads=settings.n_head, intermediate_size=d_ff,
                      max_position_embeddings=settings.max_positions, hidden_dropout_prob=settings.dropout,
                      attention_probs_dropout_prob=settings.dropout, tie_word_embeddings=settings.tie_embeddings,
                      pad_token_id=tokenizer.pad_token_id)


def auto_model_class(objective: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if objective == "causal" else AutoModelForMaskedLM


def build_model(recipe: Recipe, tokenizer):
    """The model to pretrain: from the recipe's config, or loaded from model.path to continue."""
    from llmkit.models import resolve_model

    auto = auto_model_class(recipe.train.objective)
    if recipe.model.path:
        try:
            source = resolve_model(recipe.model.path)
        except LlmkitError as error:
            raise LlmkitError(f"model.path {error}") from None
        try:
            model = auto.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise LlmkitError(f"model.path {recipe.model.path}: cannot load a "
                              f"{recipe.train.objective} model: {str(error).splitlines()[0]}") from None
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = auto.from_config(model_config(recipe.model, tokenizer, recipe.train.objective))
    check_block_size(recipe.data.block_size, model.config)
    return model


def check_block_size(block_size: int, config) -> None:
    from llmkit.models import model_positions

    positions = model_positions(config)
    if positions and block_size > positions:
        raise LlmkitError(f"data.block_size ({block_size}) is larger than the model's positions "
                          f"({config.model_type}: {positions})")


def training_precision(asked: str):
    """The precision to train in on this machine (llmkit.precision: one rule for every command)."""
    from llmkit.models import pick_device
    from llmkit.precision import choose

    return choose(asked, pick_device("auto"), training=True)


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def training_arguments(train: TrainSettings, distributed: DistributedSettings, seed: int, output_dir: Path,
                       **overrides):
    """TrainingArguments from the recipe; `overrides` (TrainingArguments fields) win."""
    import torch
    from transformers import TrainingArguments

    strategy = {}
    if distributed.strategy == "fsdp":
        strategy = {"fsdp": distributed.fsdp, "fsdp_config": distributed.fsdp_config or None}
    elif distributed.strategy == "deepspeed":
        strategy = {"deepspeed": distributed.deepspeed}
    warmup = train.warmup_steps if train.warmup_steps < 1 else int(train.warmup_steps)
    schedule = "epoch" if train.eval_every == 0 else "steps"
    precision = training_precision(train.precision).name
    return TrainingArguments(**{
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
        "report_to": "none",
        "disable_tqdm": True,  # llmkit shows its own progress
        **strategy,
        **overrides,
    })
