"""llmkit export --format gguf (llmkit/gguf_export.py): a tiny byte-level BPE Llama exported, then read back by
transformers' own GGUF loader (no llama.cpp here): the same logits (f32 exactly, q8_0 within its rounding), the
same token ids for a Chinese sentence, llama.cpp's metadata keys; and the refusals (a character-level tokenizer,
another architecture, a bad option): exit 2, one line, nothing written."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from llmkit.cli import app

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf", reason="pip install 'llmkit[gguf]'")

from tokenizers import pre_tokenizers  # noqa: E402

from llmkit.rundir import OWNER_MARK  # noqa: E402
from tests.conftest import bpe_tokenizer, char_tokenizer, problems, save_tiny_model  # noqa: E402

runner = CliRunner()
SENTENCE = "昨天天气很好，我们去北京大学看了1998年的展览。"
CHAT = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"


def export(*args: str):
    return runner.invoke(app, ["export", "--format", "gguf", *args])


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def llama(folder, tokenizer, tie: bool = True, rope: dict | None = None):
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads): both permutations."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                                      rope_parameters=rope or {"rope_type": "default", "rope_theta": 5000.0},
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("output_type, tie", [("f32", True), ("q8_0", False)])
def test_transformers_reads_back_the_same_model(tmp_path, tokenizer, one_thread, output_type, tie):
    original = llama(tmp_path / "model", tokenizer, tie)
    result = export(str(tmp_path / "model"), "--quantization", output_type)
    path = tmp_path / "model" / "gguf" / f"model-{output_type}.gguf"
    assert result.exit_code == 0, result.output
    assert result.stdout == f"exported to {path} (gguf, {output_type})\n" and problems(result.stderr) == []
    assert sorted(p.name for p in path.parent.iterdir()) == [OWNER_MARK, path.name]
    model, loaded_tokenizer = read_back(path)
    ids = tokenizer(SENTENCE).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) > 10  # BPE pieces after <s>
    assert loaded_tokenizer(SENTENCE).input_ids == ids
    assert loaded_tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE
    expected, got = logits(original, ids), logits(model, ids)
    difference = (expected - got).abs().max().item()
    if output_type == "f32":
        assert difference < 1e-5
    else:  # 8-bit blocks: close, yet not the same numbers
        assert 0 < difference < 0.05 * expected.abs().max().item()
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    assert model.config.tie_word_embeddings == tie


def test_the_file_carries_llama_cpp_keys(tmp_path, tokenizer):
    tokenizer.chat_template = CHAT
    try:
        llama(tmp_path / "model", tokenizer)
    finally:
        tokenizer.chat_template = None
    out = tmp_path / "exports"
    result = export(str(tmp_path / "model"), str(out), "--quantization", "q8_0")
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out / "model-q8_0.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 7  # MOSTLY_Q8_0
    assert {key: fields[f"llama.{key}"] for key in ("context_length", "embedding_length", "block_count",
                                                    "feed_forward_length", "attention.head_count",
                                                    "attention.head_count_kv", "rope.dimension_count",
                                                    "vocab_size")} == {
        "context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
        "vocab_size": len(tokenizer)}
    assert fields["llama.rope.freq_base"] == 5000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == [token for token, _ in sorted(tokenizer.get_vocab().items(),
                                                                            key=lambda item: item[1])]
    control = [i for i, kind in enumerate(fields["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL]
    assert control == sorted(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges] and len(merges) > 300
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"], fields["tokenizer.ggml.unknown_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.chat_template"] == CHAT
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types and len(types) == 1 + 1 + 2 * 9  # tied: llama.cpp reuses token_embd
    assert read_back(out / "model-q8_0.gguf")[1].chat_template == CHAT


def test_overwrite_replaces_the_export(tmp_path, tokenizer):
    llama(tmp_path / "model", tokenizer)
    folder = tmp_path / "model" / "gguf"
    assert export(str(tmp_path / "model")).exit_code == 0  # f16 by default, as llama.cpp's converter
    assert gguf.GGUFReader(folder / "model-f16.gguf").fields["general.file_type"].contents() == 1
    result = export(str(tmp_path / "model"), "--quantization", "bf16")
    assert result.exit_code == 2 and f"{folder} exists; pass --overwrite" in result.stderr
    assert export(str(tmp_path / "model"), "--quantization", "bf16", "--overwrite").exit_code == 0
    assert sorted(p.name for p in folder.iterdir()) == [OWNER_MARK, "model-bf16.gguf"]
    reader = gguf.GGUFReader(folder / "model-bf16.gguf")
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.BF16


def test_an_adapter_exports_merged_onto_its_base(tmp_path, tokenizer, one_thread):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from llmkit.loading import load_model

    base = llama(tmp_path / "base", tokenizer)
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                               peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert export(str(tmp_path / "adapter"), "--quantization", "f32").exit_code == 0
    ids = tokenizer(SENTENCE).input_ids
    merged = logits(load_model(str(tmp_path / "adapter"), device="cpu", dtype="float32")[0], ids)
    exported = logits(read_back(tmp_path / "adapter" / "gguf" / "model-f32.gguf")[0], ids)
    assert (exported - merged).abs().max() < 1e-5 and (exported - logits(base, ids)).abs().max() > 1e-3
    reader = gguf.GGUFReader(tmp_path / "adapter" / "gguf" / "model-f32.gguf")
    assert reader.fields["general.name"].contents() == "adapter"  # the folder exported, not its base

    prompt = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                 peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prompt.save_pretrained(tmp_path / "prompt")
    tokenizer.save_pretrained(tmp_path / "prompt")
    result = export(str(tmp_path / "prompt"))
    assert result.exit_code == 2 and f"{tmp_path / 'prompt'} is a prompt-tuning adapter: its virtual tokens" \
        in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "prompt" / "gguf").exists()


def test_refusals_say_what_converts_and_write_nothing(tmp_path, tokenizer):
    import transformers

    char_model = save_tiny_model(tmp_path / "char", "LlamaForCausalLM", char_tokenizer())
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1,
                                                         n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    bert = save_tiny_model(tmp_path / "bert", "BertForMaskedLM", char_tokenizer("mlm"))
    spaced = copy.deepcopy(tokenizer)  # a prefix space llama.cpp's "gpt-2" split does not add
    spaced.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    llama(tmp_path / "spaced", spaced)
    llama(tmp_path / "scaled", tokenizer, rope={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    llama(tmp_path / "model", tokenizer)
    converts = 'model.arch = "llama" and tokenizer.kind = "bpe"'
    cases = [
        ([str(char_model)], f"{char_model} has a character-level (WordLevel) tokenizer, which llama.cpp does not "
                            f"read: llmkit exports Llama models with a byte-level BPE tokenizer to GGUF (a recipe "
                            f"with {converts})"),
        ([str(gpt2)], f"{gpt2} is a GPT2LMHeadModel (gpt2): llmkit exports Llama models"),
        ([str(tmp_path / "spaced")], f"{tmp_path / 'spaced'}: its byte-level BPE splits text otherwise than GPT-2's "
                                     f'(pre-tokenizer {{"type": "ByteLevel", "add_prefix_space": true'),
        ([str(tmp_path / "scaled")], f"{tmp_path / 'scaled'} scales its rotary embeddings (linear): llmkit's GGUF "
                                     f"export writes plain RoPE only"),
        ([str(bert)], f"{bert} is a BertForMaskedLM: llmkit exports decoder-only language models (a causal-lm head) "
                      f"to GGUF"),
        ([str(tmp_path / "model"), "--quantization", "q4_0"], "--quantization for gguf must be one of f16, f32, "
                                                              "bf16, q8_0, got 'q4_0'"),
        ([str(tmp_path / "model"), "--quantization", "int8"], "--quantization for gguf must be one of"),
        ([str(tmp_path / "model"), str(tmp_path / "model" / "ct2")], "an export goes to"),
    ]
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    for args, message in cases:
        result = export(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    result = runner.invoke(app, ["export", "--format", "onnx", str(tmp_path / "model")])
    assert result.exit_code == 2 and "--format must be one of ct2, gguf, got 'onnx'" in result.stderr
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before
