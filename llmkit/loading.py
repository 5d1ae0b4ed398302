"""Models for every command: found and loaded, or built from a recipe.

Loading: a run directory, a model directory, a PEFT adapter directory (loaded onto its base), a quantized
directory (loaded as saved; `llmkit quantize --method dynamic-int8` output: quantized as it loads, on the
CPU) or a hub id; `runs/latest` by default. Device and dtype follow llmkit.devices.
Building: a model config sized by the recipe's [model] table, with a task's head (llmkit.tasks.HEADS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmkit.compression import MARKER, quantize_dynamic_int8
from llmkit.devices import inference_dtype, pick_device
from llmkit.errors import LlmkitError, first_line
from llmkit.recipe import looks_local
from llmkit.rundir import latest_name
from llmkit.settings import ModelSettings, Recipe
from llmkit.tasks import HEADS, TASKS
from llmkit.tokenizer import load_tokenizer
from llmkit.vision import check_vision_model, freeze_tower, load_processor, vlm_config

VISION_HEAD = "image-text-to-text"  # llmkit.tasks.HEADS: a model that reads pictures and writes text

NO_MODEL = ("no trained model found in {output_dir}/; train one with `llmkit pretrain pretrain-zh-tiny` "
            "or pass --model")
NO_MODEL_WITH_HEAD = "no trained {head} model found in {output_dir}/ (no {latest}); train one or pass --model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def resolve_model(model: str | None = None, output_dir: str | Path = "runs", head: str = "causal-lm") -> str:
    """The model to load: `model` as given, or the newest run with `head` (<output_dir>/latest for a
    causal LM, latest-<head> for the others: llmkit.rundir.latest_name). A name that looks
    local (llmkit.recipe.looks_local: `runs/x` once runs/ exists) and is not there is an error here,
    never a download attempt."""
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
    latest = Path(output_dir) / latest_name(head)
    if latest.is_file():  # a text file naming the run (where symlinks are not available)
        latest = latest.parent / latest.read_text(encoding="utf-8").strip()
    if not latest.is_dir():
        folder = str(output_dir).rstrip("/")
        message = NO_MODEL if head == "causal-lm" else NO_MODEL_WITH_HEAD
        raise LlmkitError(message.format(output_dir=folder, head=head, latest=f"{folder}/{latest_name(head)}"))
    return resolve_model(str(latest))


def model_positions(config) -> int | None:
    """The longest sequence a model's config accepts (None when it does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_model(model: str | None = None, *, output_dir: str | Path = "runs", device: str = "auto",
               dtype: str = "auto", head: str = "causal-lm"):
    """(model, tokenizer) in eval mode on the device, the tokenizer padding on the left for batches.

    `head` picks the transformers Auto class (llmkit.tasks.HEADS); a model saved without that head is refused."""
    from transformers.utils import logging as hf_logging

    source = resolve_model(model, output_dir, head)
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
        if head == VISION_HEAD:  # its processor: the image processor and the tokenizer
            tokenizer = load_processor(source)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    loaded.eval()
    prepare_tokenizer(text_tokenizer(tokenizer))
    return loaded, tokenizer


def load_pretrained(source: str, device: str, dtype: str, head: str = "causal-lm", config_source: str | None = None):
    """The model at `source`; `config_source` supplies another config (an adapter run's task head)."""
    import transformers
    from safetensors import SafetensorError

    config = loaded_config(config_source or source)
    quantized = getattr(config, "quantization_config", None) is not None
    # A quantized model loads as saved (its weights cannot be cast or moved after loading); the tensors
    # it keeps unquantized (embeddings, norms) load in the dtype asked for.
    kwargs = {"dtype": inference_dtype(dtype, device)} | ({"device_map": {"": device}} if quantized else {})
    if head == "causal-lm" and getattr(config, "is_encoder_decoder", False):
        head = "seq2seq-lm"  # a text generator too (llmkit generate): its encoder reads the prompt
    check_head(config_source or source, config, head)
    try:
        loaded = with_head(getattr(transformers, HEADS[head].auto_class), source, config=config, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a cut-short or damaged file
        raise LlmkitError(f"cannot load a {head} model from {source}: {first_line(error)}") from None
    except ImportError as error:
        raise LlmkitError(f"{source}: {first_line(error)}") from None
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
    suffixes = HEADS[head].architectures
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


def text_tokenizer(processing):
    """The tokenizer of a processor (a vision-language model's), or the tokenizer itself."""
    return getattr(processing, "tokenizer", processing)


def prepare_tokenizer(tokenizer):
    """Padding on the left by default: batches of prompts all end where generation starts (llmkit's own
    batches say their side at each call)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- building from a recipe


def model_config(settings: ModelSettings, tokenizer, objective: str):
    """A transformers config for a model built from scratch, sized by the recipe."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    if settings.arch == "ngram":
        raise LlmkitError('model.arch = "ngram" is a counted n-gram model (`llmkit pretrain` only), not a Transformer')
    if (settings.arch == "t5") != (objective == "seq2seq"):
        raise LlmkitError('model.arch = "t5" (an encoder-decoder) is for finetune.task = "seq2seq", and that task '
                          f'builds a t5 from scratch (got model.arch = "{settings.arch}")')
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
    if settings.arch == "t5":
        # T5's convention: the decoder starts from the pad token; no <s>
        return T5Config(vocab_size=vocab_size, d_model=settings.d_model, d_kv=settings.d_model // settings.n_head,
                        d_ff=d_ff, num_layers=settings.n_layer, num_decoder_layers=settings.n_layer,
                        num_heads=settings.n_head, dropout_rate=settings.dropout, feed_forward_proj="relu",
                        tie_word_embeddings=settings.tie_embeddings, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    if settings.arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=settings.d_model, n_layer=settings.n_layer,
                          n_head=settings.n_head, n_inner=d_ff, n_positions=settings.max_positions,
                          resid_pdrop=settings.dropout, embd_pdrop=settings.dropout, attn_pdrop=settings.dropout,
                          tie_word_embeddings=settings.tie_embeddings, **ids)
    if objective not in ("mlm", "mlm+nsp"):
        raise LlmkitError(f'model.arch = "{settings.arch}" needs train.objective = "mlm" or "mlm+nsp"')
    return BertConfig(vocab_size=vocab_size, hidden_size=settings.d_model, num_hidden_layers=settings.n_layer,
                      num_attention_heads=settings.n_head, intermediate_size=d_ff,
                      max_position_embeddings=settings.max_positions, hidden_dropout_prob=settings.dropout,
                      attention_probs_dropout_prob=settings.dropout, tie_word_embeddings=settings.tie_embeddings,
                      pad_token_id=tokenizer.pad_token_id)


def auto_model_class(objective: str):
    """The Auto class of a language model trained with `objective` ("causal", "mlm", or "mlm+nsp": BERT's
    pretraining heads, masked LM and next-sentence prediction)."""
    import transformers

    if objective == "mlm+nsp":
        return transformers.AutoModelForPreTraining
    return getattr(transformers, HEADS["causal-lm" if objective == "causal" else "masked-lm"].auto_class)


def build_model(recipe: Recipe, tokenizer):
    """The model to pretrain: from the recipe's config, or loaded from model.path to continue."""
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
                              f"{recipe.train.objective} model: {first_line(error)}") from None
        fit_vocabulary(model, tokenizer)
    else:
        model = auto.from_config(model_config(recipe.model, tokenizer, recipe.train.objective))
    check_block_size(recipe.data.block_size, model.config)
    return model


def check_block_size(block_size: int, config) -> None:
    positions = model_positions(config)
    if positions and block_size > positions:
        raise LlmkitError(f"data.block_size ({block_size}) is larger than the model's positions "
                          f"({config.model_type}: {positions})")


def head_options(tokenizer, labels: list[str]) -> dict:
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

    settings = recipe.finetune
    head = TASKS[settings.task].head
    auto = getattr(transformers, HEADS[head].auto_class)
    options = head_options(tokenizer, labels)
    if not recipe.model.path:
        config = model_config(recipe.model, tokenizer, objective_of(recipe.model.arch, head))
        if head == VISION_HEAD:
            config = vlm_config(recipe.vision, config, tokenizer)
        config.update(options)
        return frozen_tower(recipe, no_head_error(lambda: auto.from_config(config), config.model_type, head))
    source = resolve_model(recipe.model.path)
    if head == VISION_HEAD:
        check_vision_model(source, loaded_config(source))
    quantize = settings.method == "qlora" if quantize is None else quantize
    if quantize:
        options |= {"quantization_config": quantization_config(source, auto), "device_map": {"": pick_device()}}
    try:
        model = no_head_error(lambda: with_head(auto, source, ignore_mismatched_sizes=bool(labels), **options),
                              source, head)
    except (OSError, ImportError) as error:
        raise LlmkitError(f"model.path {source}: cannot load it: {first_line(error)}") from None
    fit_vocabulary(model, tokenizer)
    return frozen_tower(recipe, model)


def frozen_tower(recipe: Recipe, model):
    """vision.freeze_tower: a vision-language model's encoder keeps its weights."""
    if recipe.vision.freeze_tower and TASKS[recipe.finetune.task].head == VISION_HEAD:
        freeze_tower(model)
    return model


def loaded_config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise LlmkitError(f"cannot load a model from {source}: {first_line(error)}") from None


def objective_of(arch: str, head: str) -> str:
    """What a model built from scratch for a task head learns: seq2seq (encoder-decoder), mlm or causal."""
    if head == "seq2seq-lm":
        return "seq2seq"
    return "mlm" if arch == "bert" else "causal"


def fit_vocabulary(model, tokenizer) -> None:
    """Grow a loaded model's embeddings to a tokenizer with more tokens (special tokens added to it)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def no_head_error(load, what: str, head: str):
    """Run `load`; transformers' "Unrecognized configuration class" becomes a one-line LlmkitError."""
    try:
        return load()
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise LlmkitError(f"{what}: transformers has no {head} head for this architecture") from None
        raise LlmkitError(f"{what}: {first_line(error)}") from None
