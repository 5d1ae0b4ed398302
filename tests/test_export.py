"""llmkit export (llmkit/export.py): the round trip export -> load -> generate gives transformers' token ids
(Llama and GPT-2, a LoRA adapter merged on the way), int8, and the refusals: exit 2, one line naming the
option or file, nothing written. Skipped only where the ctranslate2 wheel cannot be installed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.settings import GenerateSettings

torch = pytest.importorskip("torch")
pytest.importorskip("ctranslate2", reason="the ct2 engine's wheel (pip install 'llmkit[fast]') is not installable here")

from llmkit import engines, loading  # noqa: E402
from llmkit.generation import generate_text  # noqa: E402
from llmkit.rundir import OWNER_MARK  # noqa: E402
from tests.conftest import char_tokenizer, problems, save_tiny_model  # noqa: E402

runner = CliRunner()
GREEDY = GenerateSettings(max_new_tokens=30, greedy=True, repetition_penalty=1.0)


def export(*args: str):
    return runner.invoke(app, ["export", "--format", "ct2", *args])


def same_ids_as_transformers(model_dir, export_dir) -> None:
    hf, hf_tokenizer = loading.load_model(str(model_dir))
    ct2, tokenizer = engines.load_generator(str(export_dir), engine="ct2")
    for prompt in ("昨天天气很", "我们的国家"):
        assert generate_text(ct2, tokenizer, prompt, GREEDY).ids == generate_text(hf, hf_tokenizer, prompt, GREEDY).ids


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def gpt2_model(folder, tokenizer):
    import transformers

    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_round_trip_gives_transformers_ids(tmp_path, tokenizer, arch):
    model_dir = (save_tiny_model(tmp_path / "model", "LlamaForCausalLM", tokenizer, d_model=64) if arch == "llama"
                 else gpt2_model(tmp_path / "model", tokenizer))
    result = export(str(model_dir))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"exported to {model_dir / 'ct2'} (ct2, float32)\n" and problems(result.stderr) == []
    folder = model_dir / "ct2"
    record = json.loads((folder / engines.EXPORT_FILE).read_text(encoding="utf-8"))
    assert record["quantization"] == "float32" and record["source"] == str(model_dir)
    assert (folder / OWNER_MARK).is_file() and (folder / "tokenizer.json").is_file()
    same_ids_as_transformers(model_dir, folder)
    assert isinstance(engines.load_generator(str(model_dir))[0], engines.Ct2Model)  # auto finds it


def test_int8_export_elsewhere_and_overwrite(tmp_path, tokenizer):
    model_dir = save_tiny_model(tmp_path / "model", "LlamaForCausalLM", tokenizer, d_model=64)
    out = tmp_path / "exports" / "int8"
    assert export(str(model_dir), str(out), "--quantization", "int8").exit_code == 0
    assert export(str(model_dir)).exit_code == 0
    float_size = (model_dir / "ct2" / "model.bin").stat().st_size
    assert (out / "model.bin").stat().st_size < float_size / 2  # int8 weights (embeddings included)
    ct2, ct2_tokenizer = engines.load_generator(str(out))
    assert generate_text(ct2, ct2_tokenizer, "今天", GREEDY).new_tokens == GREEDY.max_new_tokens
    result = export(str(model_dir), str(out))
    assert result.exit_code == 2 and f"{out} exists; pass --overwrite" in result.stderr
    result = export(str(model_dir), str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / engines.EXPORT_FILE).read_text(encoding="utf-8"))["quantization"] == "float32"
    same_ids_as_transformers(model_dir, out)
    assert not any(path.name.startswith(".") and path.name != OWNER_MARK for path in out.parent.iterdir())


def test_an_adapter_exports_merged_onto_its_base(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = save_tiny_model(tmp_path / "base", "LlamaForCausalLM", tokenizer, d_model=64)
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert export(str(tmp_path / "adapter")).exit_code == 0
    same_ids_as_transformers(tmp_path / "adapter", tmp_path / "adapter" / "ct2")
    base_ids = generate_text(*loading.load_model(str(base)), "昨天天气很", GREEDY).ids
    assert generate_text(*engines.load_generator(str(tmp_path / "adapter")), "昨天天气很", GREEDY).ids != base_ids


def test_refusals_name_the_problem_and_write_nothing(tmp_path, tokenizer):
    model_dir = save_tiny_model(tmp_path / "model", "LlamaForCausalLM", tokenizer)
    bert = save_tiny_model(tmp_path / "bert", "BertForMaskedLM", char_tokenizer("mlm"))
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep", encoding="utf-8")
    cases = [
        ([str(bert)], f"{bert} is a BertForMaskedLM: llmkit exports decoder-only language models"),
        ([str(model_dir), "--quantization", "int4"], "--quantization for ct2 must be one of float32, int8"),
        ([str(model_dir), "--format", "onnx"], "--format must be one of ct2, gguf, got 'onnx'"),
        ([str(model_dir), str(model_dir)], "the output cannot be the model"),
        ([str(model_dir), str(tmp_path)], "the output cannot be the model"),
        ([str(model_dir), str(model_dir / "elsewhere")], "inside the model folder, an export goes to"),
        ([str(model_dir), str(user_folder), "--overwrite"], "is not an llmkit output"),
        ([str(tmp_path / "absent")], "model not found"),
    ]
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    for args, message in cases:
        result = runner.invoke(app, ["export", *args] if "--format" in args else ["export", "--format", "ct2", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before
    assert (user_folder / "notes.txt").read_text(encoding="utf-8") == "keep"


def test_a_failed_conversion_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model", "LlamaForCausalLM", tokenizer)
    before = sorted(tmp_path.rglob("*"))

    def broken(*args, **kwargs):
        raise ValueError("no conversion for this")

    monkeypatch.setattr("ctranslate2.converters.TransformersConverter.convert", broken)
    result = export(str(model_dir))
    assert result.exit_code == 2 and "CTranslate2 cannot convert it: no conversion for this" in result.stderr
    assert sorted(tmp_path.rglob("*")) == before
