"""Find and load a model for any command: a run directory, a model directory, a PEFT adapter directory
(loaded onto its base), a quantized directory (loaded as saved; `llmkit quantize --method dynamic-int8`
output: quantized as it loads, on the CPU) or a hub id; `runs/latest` by default."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.rundir import LATEST
from llmkit.tokenizer import load_tokenizer

NO_MODEL = ("no trained model found in {output_dir}/; train one with `llmkit pretrain pretrain-zh-tiny` "
            "or pass --model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
HEADS = {  # task head -> transformers Auto class
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}
HEAD_SUFFIXES = {
    "causal-lm": ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"),
    "masked-lm": ("ForMaskedLM", "ForPreTraining"),
    "sequence-classification": ("ForSequenceClassification",),
    "token-classification": ("ForTokenClassification",),
    "question-answering": ("ForQuestionAnswering",),
}


def resolve_model(model: str | None = None, output_dir: str | Path = "runs") -> str:
    """The model to load: `model` as given, or the newest run (<output_dir>/latest). A name that looks
    local (llmkit.recipe.looks_local: `runs/x` once runs/ exists) and is not there is an error here,
    never a download attempt."""
    from llmkit.recipe import looks_local

    if model:
        path = Path(model).expanduser()
        if path.exists():
            if path.is_dir() and any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
                return str(path)
            hint = " (a run without its final model? pass a checkpoint folder)" if (path / "checkpoints").is_dir() else ""
            raise LlmkitError(f"{model}: not a model (no config.json or adapter_config.json){hint}")
        if looks_local(model):
            raise LlmkitError(f"model not found: {model} (no such folder)")
        return model  # a hub id such as Qwen/Qwen2.5-0.5B
    latest = Path(output_dir) / LATEST
    if latest.is_file():  # a text file naming the run (where symlinks are not available)
        latest = latest.parent / latest.read_text(encoding="utf-8").strip()
    if not latest.is_dir():
        raise LlmkitError(NO_MODEL.format(output_dir=str(output_dir).rstrip("/")))
    return resolve_model(str(latest))


def pick_device(device: str = "auto") -> str:
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (device == "cuda" and not cuda) or (device == "mps" and not mps):
        raise LlmkitError(f"--device {device}: not available on this machine")
    return device


def pick_dtype(dtype: str, device: str):
    """The torch dtype to load a model in for inference: `dtype`, or for "auto" llmkit.precision's rule."""
    from llmkit.precision import choose

    return choose(dtype, device, training=False).dtype


def model_positions(config) -> int | None:
    """The longest sequence a model's config accepts (None when it does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_model(model: str | None = None, *, output_dir: str | Path = "runs", device: str = "auto",
               dtype: str = "auto", head: str = "causal-lm"):
    """(model, tokenizer) in eval mode on the device, the tokenizer padding on the left for batches.

    `head` picks the transformers Auto class (see HEADS); a model saved without that head is refused."""
    from transformers.utils import logging as hf_logging

    source = resolve_model(model, output_dir)
    device = pick_device(device)
    path = Path(source)
    quiet = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
    if quiet:  # no "Loading weights" bars in logs and captured stderr
        hf_logging.disable_progress_bar()
    try:
        if (path / "adapter_config.json").is_file():
            loaded, tokenizer = load_adapter(path, device, dtype, head)
        else:
            loaded = load_pretrained(source, device, dtype, head)
            tokenizer = load_tokenizer(source)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    loaded.eval()
    return loaded, prepare_tokenizer(tokenizer)


def load_pretrained(source: str, device: str, dtype: str, head: str = "causal-lm", config_source: str | None = None):
    """The model at `source`; `config_source` supplies another config (an adapter run's task head)."""
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(config_source or source)
    except (OSError, ValueError) as error:
        raise LlmkitError(f"cannot load a model from {config_source or source}: {first_line(error)}") from None
    quantized = getattr(config, "quantization_config", None) is not None
    # A quantized model loads as saved (its weights cannot be cast or moved after loading); the tensors
    # it keeps unquantized (embeddings, norms) load in the dtype asked for.
    kwargs = {"dtype": pick_dtype(dtype, device)} | ({"device_map": {"": device}} if quantized else {})
    check_head(config_source or source, config, head)
    try:
        loaded = with_head(getattr(transformers, HEADS[head]), source, config=config, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a cut-short or damaged file
        raise LlmkitError(f"cannot load a {head} model from {source}: {first_line(error)}") from None
    except ImportError as error:
        raise LlmkitError(f"{source}: {first_line(error)}") from None
    from llmkit.quantize import MARKER, quantize_dynamic_int8

    if getattr(config, MARKER, None) == "dynamic-int8":  # saved in fp32; int8 linear layers (CPU) made now
        return quantize_dynamic_int8(loaded)
    return loaded if quantized else loaded.to(device)


def with_head(auto_class, source: str, **kwargs):
    """`auto_class.from_pretrained(source, **kwargs)`, also from a checkpoint saved with another head
    that names the backbone differently (LlamaForCausalLM: "model", LlamaForQuestionAnswering:
    "transformer"): the backbone then loads on its own instead of staying random."""
    import transformers

    model, info = auto_class.from_pretrained(source, output_loading_info=True, **kwargs)
    prefix = model.base_model_prefix
    if any(key.startswith(f"{prefix}.") for key in info["missing_keys"]):
        backbone = {k: v for k, v in kwargs.items() if k in ("config", "dtype", "quantization_config", "device_map")}
        setattr(model, prefix, transformers.AutoModel.from_pretrained(source, **backbone))
    return model


def check_head(source: str, config, head: str) -> None:
    """Refuse a model whose saved head does not fit the task (a causal LM scored as a classifier)."""
    saved = config.architectures or []
    suffixes = HEAD_SUFFIXES[head]
    if saved and not any(name.endswith(suffixes) for name in saved):
        raise LlmkitError(f"{source} is a {saved[0]}: it has no {head} head (expected a model whose "
                          f"architecture ends with {' or '.join(suffixes)})")


def load_adapter(path: Path, device: str, dtype: str, head: str = "causal-lm"):
    """A PEFT adapter on its base model (merged into it, unless the base is quantized)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise LlmkitError(f"{path} is a PEFT adapter; loading it needs peft: pip install peft") from None
    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LlmkitError(f"{path / 'adapter_config.json'}: cannot read: {error}") from None
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise LlmkitError(f"{path / 'adapter_config.json'}: no base_model_name_or_path")
    if not Path(base).expanduser().exists() and (path / base).exists():
        base = str(path / base)  # relative to the adapter
    base_source = resolve_model(base)
    # An llmkit fine-tuning run keeps the task model's config (head, labels) beside the adapter.
    head_config = str(path) if (path / "config.json").is_file() else None
    base_model = load_pretrained(base_source, device, dtype, head, config_source=head_config)
    model = PeftModel.from_pretrained(base_model, str(path))
    lora = not model.peft_config[model.active_adapter].is_prompt_learning
    if lora and getattr(base_model.config, "quantization_config", None) is None:
        model = model.merge_and_unload()
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    return model, load_tokenizer(str(path) if has_tokenizer else base_source)


def prepare_tokenizer(tokenizer):
    tokenizer.padding_side = "left"  # batches: every prompt ends where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
