"""GGUF files for llama.cpp and Ollama (`llmkit export --format gguf`, `pip install 'llmkit[gguf]'`):

    from llmkit.gguf_export import load_convertible, write_gguf

    model, tokenizer = load_convertible("runs/pretrain-zh-bpe")   # refuses, naming why, what does not convert
    write_gguf(model, tokenizer, Path("runs/pretrain-zh-bpe/gguf/model-f16.gguf"), "f16")

The `gguf` package is llama.cpp's own Python library: it writes the file, names the tensors and knows the
tokenizer's keys, but llama.cpp's converter from transformers (convert_hf_to_gguf.py) is not in it. This module
does what that script does for a Llama model with a byte-level BPE tokenizer: tensors under
gguf.TensorNameMap's names, Q and K rows permuted into the rotary layout llama.cpp computes in, the
hyperparameters under llama.* keys, the vocabulary as a "gpt2" tokenizer (tokens, token types, merges, special
ids, add-BOS flag and chat template through gguf.SpecialVocab), 2-D weights in the output type and the rest in
f32. Refused: other architectures, rope scaling, and tokenizers llama.cpp cannot rebuild from a Hugging Face
one: character-level (WordLevel, llmkit's tokenizer.kind = "char"), or a byte-level BPE whose pre-tokenizer is
not GPT-2's (llama.cpp names those by a hash of known tokenizers, which a freshly trained one is not).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llmkit.errors import LlmkitError

EXPORT_DIR = "gguf"  # <model>/gguf/model-<type>.gguf by default
OUTPUT_TYPES = ("f16", "f32", "bf16", "q8_0")  # llama.cpp's --outtype names; f16 is its default too
INSTALL = "pip install 'llmkit[gguf]'"
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split (ByteLevel with its regex), the one llmkit trains
CONVERTS = ('llmkit exports Llama models with a byte-level BPE tokenizer to GGUF (a recipe with '
            'model.arch = "llama" and tokenizer.kind = "bpe")')


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise LlmkitError(f"--format gguf needs the gguf package: {INSTALL}") from None
    return gguf


def file_name(output_type: str) -> str:
    return f"model-{output_type}.gguf"


# ---------------------------------------------------------------- what converts


def load_convertible(source: str):
    """(model in float32, tokenizer) of the model at `source` (an adapter merged onto its base), once its
    architecture and tokenizer are known to convert."""
    from llmkit.engines import exportable_config
    from llmkit.loading import load_model

    check_llama(exportable_config(source, "GGUF", "--quantization q8_0"), source)
    model, tokenizer = load_model(source, device="cpu", dtype="float32")
    if hasattr(model, "peft_config"):  # LoRA-like adapters arrive merged; prompt tuning's virtual tokens cannot
        kind = model.peft_config[model.active_adapter].peft_type.value.lower().replace("_", "-")
        raise LlmkitError(f"{source} is a {kind} adapter: its virtual tokens are no weights of the model, and "
                          f"GGUF holds a plain model")
    check_tokenizer(tokenizer, source)
    return model, tokenizer


def check_llama(config, source: str) -> None:
    name = (config.architectures or [type(config).__name__])[0]
    if config.model_type != "llama":
        raise LlmkitError(f"{source} is a {name} ({config.model_type}): {CONVERTS}; llama.cpp's "
                          f"convert_hf_to_gguf.py converts many more")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise LlmkitError(f"{source} scales its rotary embeddings ({rope['rope_type']}): llmkit's GGUF export "
                          f"writes plain RoPE only; llama.cpp's convert_hf_to_gguf.py converts it")


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope_theta in config.rope_parameters, 4.x on the config itself."""
    return getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}


def check_tokenizer(tokenizer, source: str) -> None:
    """A byte-level BPE with GPT-2's split, as llmkit trains it (tokenizer.kind = "bpe")."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {}).get("type", type(tokenizer).__name__)
    if model == "WordLevel":
        raise LlmkitError(f"{source} has a character-level (WordLevel) tokenizer, which llama.cpp does not "
                          f"read: {CONVERTS}")
    pre, decoder = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    if model != "BPE" or spec["model"].get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise LlmkitError(f"{source} has a {model} tokenizer that is not a byte-level BPE: {CONVERTS}; llama.cpp's "
                          f"convert_hf_to_gguf.py converts the tokenizers of the models it knows")
    gpt2_split = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
                  and not spec.get("normalizer"))
    if not gpt2_split:
        raise LlmkitError(f"{source}: its byte-level BPE splits text otherwise than GPT-2's (pre-tokenizer "
                          f"{json.dumps(pre)[:80]}, normalizer {json.dumps(spec.get('normalizer'))[:40]}); llama.cpp "
                          f"knows other splits by a hash of the tokenizers its convert_hf_to_gguf.py ships: {CONVERTS}")


# ---------------------------------------------------------------- writing


def write_gguf(model, tokenizer, path: Path, output_type: str = "f16", name: str | None = None) -> None:
    """The GGUF file of a model load_convertible accepted, at `path` (its folder exists); `name` (general.name,
    what llama.cpp and Ollama show) defaults to the model folder's."""
    gguf = require_gguf()
    if output_type not in OUTPUT_TYPES:
        raise LlmkitError(f"--quantization for gguf must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    config = model.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(config.name_or_path).name)
    add_hyperparameters(writer, config)
    add_vocabulary(writer, tokenizer, config)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[output_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, array in llama_cpp_tensors(model):
        data, kind = encoded(array, name, output_type)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_hyperparameters(writer, config) -> None:
    """The llama.* keys llama.cpp reads (convert_hf_to_gguf.py's LlamaModel.set_gguf_parameters)."""
    heads = config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_rope_freq_base(rope_parameters(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def add_vocabulary(writer, tokenizer, config) -> None:
    """Tokens as the byte-level vocabulary spells them, each with its type (special added tokens are
    CONTROL, other added ones USER_DEFINED, ids the model has beyond the vocabulary UNUSED [PAD<i>]), then
    merges, special ids, the add-BOS flag and the chat template, read by gguf.SpecialVocab from the saved files."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(config.vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL if index not in added else
                         gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        config.save_pretrained(scratch)  # bos/eos/pad ids the tokenizer files leave out
        gguf.SpecialVocab(scratch, load_merges=True, n_vocab=config.vocab_size).add_to_gguf(writer, quiet=True)


def llama_cpp_tensors(model):
    """(GGUF name, float32 array) of every weight; a tied output matrix is left to token_embd, as llama.cpp
    reads it."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LlmkitError(f"{config.name_or_path}: no GGUF name for the tensor {hf_name}")
        array = tensor.detach().float().numpy()
        if ".q_proj." in hf_name:
            array = rotary_layout(array, heads)
        elif ".k_proj." in hf_name:
            array = rotary_layout(array, config.num_key_value_heads or heads)
        yield name, array


def rotary_layout(weights, heads: int):
    """transformers rotates the two halves of each head, llama.cpp adjacent pairs: the rows of Q and K
    reordered to match (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def encoded(array, name: str, output_type: str):
    """(data, GGML type): norms and other 1-D tensors stay f32, as llama.cpp computes them; a matrix whose rows
    do not fill q8_0's blocks of 32 falls back to f16, as convert_hf_to_gguf.py does."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    kind = Q.F32 if array.ndim <= 1 or name.endswith("_norm.weight") else {
        "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[output_type]
    try:
        return gguf.quants.quantize(array, kind), kind
    except gguf.QuantError:
        return gguf.quants.quantize(array, Q.F16), Q.F16
