"""Magnitude pruning for `llmkit quantize --method prune`.

- unstructured: zero the smallest-magnitude share of every weight matrix of the model body (embeddings
  and heads are kept); the masks stay on while a recovery fine-tune runs, `make_permanent` bakes them in.
  The matrices keep their shape: the files do not shrink (dense storage), only the weights turn to zeros.
- mlp-units / attention-heads: remove the weakest whole MLP units (Llama-style gate/up/down or GPT-2
  c_fc/c_proj) or attention heads (Llama-style; a whole key/value group at a time) in every layer, so the
  matrices and the saved config shrink and plain transformers loads the smaller model.
"""

from __future__ import annotations

from llmkit.errors import LlmkitError

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
