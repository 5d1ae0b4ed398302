"""Parameter-efficient fine-tuning through PEFT: LoRA, DoRA, QLoRA (LoRA on a 4-bit NF4 base),
prompt tuning and prefix tuning; and merging a trained adapter back into its base."""

from __future__ import annotations

from pathlib import Path

from llmkit.compression import four_bit_config
from llmkit.devices import gpu_precision
from llmkit.errors import LlmkitError, first_line
from llmkit.settings import ADAPTER_METHODS, FinetuneSettings
from llmkit.tasks import TASKS
from llmkit.vision import LANGUAGE_MODEL_LINEARS, PROJECTOR

HEAD_MODULES = ["score", "classifier", "qa_outputs"]  # new task heads: trained in full beside the adapter


def quantization_config(source: str, auto_class):
    """QLoRA's base: NF4 weights with double quantization; matmuls in the GPU's precision (llmkit.devices),
    fp32 on CPUs (the same adapter on every CPU). The task heads and the layers bitsandbytes' 4-bit kernels
    cannot take stay in full precision (llmkit.compression)."""
    import torch

    compute = gpu_precision().dtype if torch.cuda.is_available() else torch.float32
    return four_bit_config(source, auto_class, compute_dtype=compute, skip=(*HEAD_MODULES, "lm_head"))


def peft_config(settings: FinetuneSettings, model):
    import peft

    task_type = TASKS[settings.task].peft_task_type
    if settings.method in ADAPTER_METHODS:
        heads = [name for name in HEAD_MODULES if hasattr(model, name)]
        targets = "all-linear"
        if hasattr(model.config, "vision_config"):  # a vision-language model: the adapter on its language model
            targets, heads = LANGUAGE_MODEL_LINEARS, [*heads, PROJECTOR]
        return peft.LoraConfig(task_type=task_type, r=settings.lora_r, lora_alpha=settings.lora_alpha,
                               lora_dropout=settings.lora_dropout, use_dora=settings.method == "dora",
                               target_modules=settings.target_modules or targets,
                               modules_to_save=heads or None)
    if settings.method == "prompt-tuning":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=settings.num_virtual_tokens)
    return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=settings.num_virtual_tokens)


def apply_method(settings: FinetuneSettings, model):
    """The model to train: itself (full), or wrapped by PEFT with only the adapter trainable."""
    if settings.method == "full":
        return model
    try:
        import peft
    except ImportError:
        raise LlmkitError(f'finetune.method = "{settings.method}" needs peft: pip install peft') from None
    if settings.method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        return peft.get_peft_model(model, peft_config(settings, model))
    except (ValueError, TypeError, AttributeError, NotImplementedError) as error:
        raise LlmkitError(f'finetune.method = "{settings.method}" does not fit this {model.config.model_type} '
                          f'model: {first_line(error)}') from None


def merge_adapter(adapter_dir: Path, output_dir: Path, load_base) -> None:
    """Base (full precision, also for QLoRA) + adapter merged into one plain transformers model.

    `load_base()` returns the unquantized base model with the task's head."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_base(), str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(output_dir))
