"""Compressing a model in memory, for `llmkit quantize` (and QLoRA's 4-bit base, and every command that
loads a dynamic-int8 model): bitsandbytes int8 / NF4 / FP4, torch dynamic int8, and magnitude pruning.

bitsandbytes: a weight is quantized in blocks of 64 values along each row, and its packed CPU kernel (taken
on CPUs with avx512_bf16) also groups rows by 32: a layer whose input width is not a multiple of 64, or
whose output width is not a multiple of 32, fails there (`shape '[32, 0]' is invalid`). Such layers stay in
full precision, on every machine alike, so that a recipe gives the same model wherever it runs; real
models (widths of 256 and more) lose nothing by it.

Dynamic int8 (torch.ao): saved in fp32 with a marker in config.json, made int8 as llmkit loads it (CPU).

Pruning:
- unstructured: zero the smallest-magnitude share of every weight matrix of the model body (embeddings
  and heads are kept); the masks stay on while a recovery fine-tune runs, `make_permanent` bakes them in.
  The matrices keep their shape: the files do not shrink (dense storage), only the weights turn to zeros.
- mlp-units / attention-heads: remove the weakest whole MLP units (Llama-style gate/up/down or GPT-2
  c_fc/c_proj) or attention heads (Llama-style; a whole key/value group at a time) in every layer, so the
  matrices and the saved config shrink and plain transformers loads the smaller model.
"""

from __future__ import annotations

from llmkit.devices import pick_device
from llmkit.errors import LlmkitError, first_line
from llmkit.settings import QuantizeSettings
from llmkit.tasks import HEADS

MARKER = "llmkit_quantization"  # config.json key; "dynamic-int8": fp32 weights, int8 linear layers made at load
BNB_CPU_VERSION = "0.45"  # bitsandbytes quantizes on CPUs from this version


# ---------------------------------------------------------------- bitsandbytes

BLOCK_IN, BLOCK_OUT = 64, 32  # bitsandbytes' 4-bit block size; its packed CPU kernel's row group
WHY_KEPT = (f"kept in full precision: bitsandbytes' 4-bit kernels need an input width that is a multiple of "
            f"{BLOCK_IN} and an output width that is a multiple of {BLOCK_OUT}")


def four_bit_misfits(model) -> list[str]:
    """The linear layers of `model` that bitsandbytes' 4-bit kernels cannot take, named relative to its
    backbone ("layers.0.mlp.down_proj"): transformers matches such a name as a suffix, so it holds whether
    the backbone loads inside a task model or alone."""
    import torch

    backbone = getattr(model, model.base_model_prefix, model)
    return [name for name, module in backbone.named_modules()
            if isinstance(module, torch.nn.Linear) and not fits_four_bit(module.in_features, module.out_features)]


def fits_four_bit(in_features: int, out_features: int) -> bool:
    return in_features % BLOCK_IN == 0 and out_features % BLOCK_OUT == 0


def four_bit_config(source: str, auto_class, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype=None, skip: tuple[str, ...] = ()):
    """A BitsAndBytesConfig for 4-bit weights of `auto_class` loaded from `source`. What transformers keeps
    in full precision by default (the output layer), `skip` (module names) and the layers that do not fit
    the 4-bit kernels stay unquantized."""
    import torch
    from transformers import AutoConfig, BitsAndBytesConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):  # shapes only: nothing is allocated or read
        model = auto_class.from_config(AutoConfig.from_pretrained(source))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32,
                              llm_int8_skip_modules=sorted({*get_keys_to_not_convert(model), *skip,
                                                            *four_bit_misfits(model)}))


def check_bitsandbytes(method: str) -> None:
    """Refuse a bitsandbytes method where it cannot run, naming what to install."""
    from importlib import metadata

    import torch
    from packaging.version import Version

    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        raise LlmkitError(f"{method} needs bitsandbytes: pip install 'bitsandbytes>={BNB_CPU_VERSION}'") from None
    if not torch.cuda.is_available() and Version(version) < Version(BNB_CPU_VERSION):
        raise LlmkitError(f"{method} without a CUDA GPU needs bitsandbytes >= {BNB_CPU_VERSION} "
                          f"(installed: {version}): pip install -U bitsandbytes")


def bnb_config(source: str, settings: QuantizeSettings, auto_class):
    import torch
    from transformers import BitsAndBytesConfig

    if settings.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=settings.int8_threshold)
    return four_bit_config(source, auto_class, quant_type=settings.method.removeprefix("bnb-"),
                           double_quant=settings.double_quant, compute_dtype=getattr(torch, settings.compute_dtype))


def quantize_bitsandbytes(source: str, settings: QuantizeSettings, head: str):
    """The model at `source` with `head`, its linear layers quantized by bitsandbytes as it loads;
    -> (model, details for the report)."""
    import bitsandbytes as bnb
    import torch
    import transformers

    auto_class = getattr(transformers, HEADS[head].auto_class)
    config = bnb_config(source, settings, auto_class)
    try:
        model = auto_class.from_pretrained(source, quantization_config=config, device_map={"": pick_device("auto")},
                                           dtype=getattr(torch, settings.dtype))
    except (ValueError, NotImplementedError, RuntimeError) as error:
        raise LlmkitError(f"bitsandbytes cannot quantize {source}: {first_line(error)}") from None
    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    if not layers:
        raise LlmkitError(f"bitsandbytes found no linear layers to quantize in {source} "
                          f"({model.config.model_type}); try method = \"dynamic-int8\" or \"prune\"")
    details = {"bitsandbytes": {k: v for k, v in config.to_dict().items() if not k.startswith("_")},
               "quantized_layers": len(layers), "unquantized_tensors_dtype": settings.dtype}
    misfits = four_bit_misfits(model) if config.load_in_4bit else []
    if misfits:
        details["kept_in_full_precision"] = {"layers": misfits, "why": WHY_KEPT}
    return model, details


# ---------------------------------------------------------------- dynamic int8 (the one place that names torch.ao)


def check_dynamic_int8() -> None:
    import torch

    if not set(torch.backends.quantized.supported_engines) - {"none"}:
        raise LlmkitError("dynamic-int8 needs a PyTorch build with a quantized CPU engine (x86/fbgemm or "
                          "qnnpack); this one has none")


def quantize_dynamic_int8(model):
    """int8 weights for every nn.Linear but the output layer, activations quantized on the fly: faster
    generation on CPUs. The output layer (next-token logits) stays fp32: a small share of the compute in
    larger models, and a little quality on small ones (quickstart model: perplexity +0.80% instead of
    +0.87%; per-channel weights give +0.79%: the rest is fbgemm's 7-bit dynamic activations).

    What `llmkit.loading` applies to a folder marked dynamic-int8; swap this body to change backend."""
    import warnings

    import torch

    output = model.get_output_embeddings()
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    layers = {name: qconfig for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not output}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that eager-mode quantization moves to torchao
        return torch.ao.quantization.quantize_dynamic(model.to("cpu"), layers, dtype=torch.qint8)


def packed_weights(model) -> list:
    """(weight, bias) of the linear layers whose int8 weights are packed (not among model.parameters())."""
    import torch

    return [m._weight_bias() for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]


# ---------------------------------------------------------------- pruning

# MLP shapes: (modules whose outputs are the units, modules that read the units, config key of the count)
MLP_SHAPES = ((("gate_proj", "up_proj"), ("down_proj",), "intermediate_size"),
              (("c_fc",), ("c_proj",), "n_inner"))
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def prune_model(model, structure: str, sparsity: float) -> dict:
    """Prune in place; returns what was removed."""
    if structure == "unstructured":
        return prune_unstructured(model, sparsity)
    if structure == "mlp-units":
        return prune_mlp_units(model, sparsity)
    return prune_attention_heads(model, sparsity)


def body_linears(model) -> list:
    """The weight matrices of the model body (transformer layers): not embeddings, not task heads."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.base_model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def prune_unstructured(model, sparsity: float) -> dict:
    from torch.nn.utils import prune

    linears = body_linears(model)
    if not linears:
        raise LlmkitError(f"{type(model).__name__} has no linear layers to prune")
    for module in linears:
        prune.l1_unstructured(module, "weight", amount=sparsity)
    return {"structure": "unstructured", "matrices": len(linears),
            "weights_pruned": sum(int((m.weight_mask == 0).sum()) for m in linears),
            "weights_in_matrices": sum(m.weight_mask.numel() for m in linears)}


def make_permanent(model) -> None:
    """Fold the pruning masks into the weights (unstructured pruning), so the model saves as a plain one."""
    from torch.nn.utils import prune

    for module in model.modules():
        if hasattr(module, "weight_mask"):
            prune.remove(module, "weight")


def units_to_remove(count: int, sparsity: float, what: str) -> int:
    removed = round(count * sparsity)
    if not 0 < removed < count:
        raise LlmkitError(f"quantize.sparsity = {sparsity} of {count} {what} per layer removes {removed}: "
                          f"choose a sparsity that removes at least one and keeps at least one")
    return removed


def prune_mlp_units(model, sparsity: float) -> dict:
    """Remove the MLP units whose weights (in and out) have the smallest norms, as many in every layer."""
    for produce, consume, config_key in MLP_SHAPES:
        mlps = [m for m in model.base_model.modules() if all(hasattr(m, n) for n in produce + consume)]
        if mlps:
            break
    else:
        raise LlmkitError(f"structured pruning of MLP units supports Llama-style and GPT-2 models, not "
                          f"{model.config.model_type} (use quantize.structure = \"unstructured\")")
    units = unit_norms(getattr(mlps[0], produce[0]), "out").numel()
    keep_count = units - units_to_remove(units, sparsity, "MLP units")
    before = sum(module_parameters(mlp) for mlp in mlps)
    for mlp in mlps:
        score = 1.0
        for name in produce:
            score = score * unit_norms(getattr(mlp, name), "out")
        for name in consume:
            score = score * unit_norms(getattr(mlp, name), "in")
        keep = score.topk(keep_count).indices.sort().values
        for name in produce:
            shrink(getattr(mlp, name), keep, "out")
        for name in consume:
            shrink(getattr(mlp, name), keep, "in")
    setattr(model.config, config_key, keep_count)
    return {"structure": "mlp-units", "units_per_layer": f"{units} -> {keep_count}", "layers": len(mlps),
            "mlp_parameters": f"{before:,} -> {sum(module_parameters(mlp) for mlp in mlps):,}"}


def prune_attention_heads(model, sparsity: float) -> dict:
    """Remove the key/value groups (with their query heads) whose value and output weights have the
    smallest norms, as many in every layer; Llama-style attention only."""
    import torch

    layers = [m for m in model.base_model.modules() if all(hasattr(m, n) for n in ATTENTION)]
    config = model.config
    if not layers or not hasattr(layers[0], "head_dim"):
        raise LlmkitError(f"structured pruning of attention heads supports Llama-style models, not "
                          f"{config.model_type} (use quantize.structure = \"mlp-units\" or \"unstructured\")")
    head_dim = layers[0].head_dim
    groups = config.num_key_value_heads or config.num_attention_heads
    per_group = config.num_attention_heads // groups
    keep_count = groups - units_to_remove(groups, sparsity, "key/value head groups")
    for attention in layers:
        value = attention.v_proj.weight.view(groups, -1)
        output = attention.o_proj.weight.t().reshape(groups, -1)
        kept = (value.norm(dim=1) * output.norm(dim=1)).topk(keep_count).indices.sort().values
        kv_rows = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()
        q_heads = (kept[:, None] * per_group + torch.arange(per_group)).flatten()
        q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        shrink(attention.q_proj, q_rows, "out")
        shrink(attention.k_proj, kv_rows, "out")
        shrink(attention.v_proj, kv_rows, "out")
        shrink(attention.o_proj, q_rows, "in")
    config.head_dim = head_dim  # no longer hidden_size / heads
    config.num_attention_heads, config.num_key_value_heads = keep_count * per_group, keep_count
    return {"structure": "attention-heads", "heads_per_layer": f"{groups * per_group} -> {keep_count * per_group}",
            "layers": len(layers)}


def unit_dim(module, side: str) -> int:
    """The weight dimension that indexes the module's outputs ('out') or inputs ('in'): nn.Linear stores
    [out, in], GPT-2's Conv1D [in, out]."""
    import torch

    return (0 if side == "out" else 1) ^ (not isinstance(module, torch.nn.Linear))


def unit_norms(module, side: str):
    """The L2 norm of the weights attached to each output ('out') or input ('in') unit."""
    dim = unit_dim(module, side)
    return module.weight.detach().norm(dim=1 - dim)


def shrink(module, keep, side: str) -> None:
    """Keep only the `keep` outputs or inputs of a Linear / Conv1D, in place."""
    import torch

    dim = unit_dim(module, side)
    module.weight = torch.nn.Parameter(module.weight.detach().index_select(dim, keep).clone())
    if side == "out" and module.bias is not None:
        module.bias = torch.nn.Parameter(module.bias.detach()[keep].clone())
    if isinstance(module, torch.nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    else:
        module.nx, module.nf = module.weight.shape


def module_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
