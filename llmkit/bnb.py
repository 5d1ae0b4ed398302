"""bitsandbytes glue shared by `llmkit quantize` and QLoRA: the 4-bit configuration, and which linear
layers its 4-bit kernels can take.

bitsandbytes quantizes a weight in blocks of 64 values along each row, and its packed CPU kernel (taken on
CPUs with avx512_bf16) also groups rows by 32: a layer whose input width is not a multiple of 64, or whose
output width is not a multiple of 32, fails there (`shape '[32, 0]' is invalid`). Such layers stay in full
precision, on every machine alike, so that a recipe gives the same model wherever it runs; real models
(widths of 256 and more) lose nothing by it.
"""

from __future__ import annotations

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

