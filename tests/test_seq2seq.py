"""The encoder-decoder task (llmkit/task_kinds/seq2seq.py): features, padding, a tiny T5 trained from
scratch and reloaded, generation that returns only the new tokens, the peoples-daily-pinyin data set
and the per-character dictionary baseline."""

from __future__ import annotations

import json

import pytest
import torch

from llmkit import finetune, generate, load_recipe, task_data
from llmkit.corpora import MAX_PINYIN_CHARS, peoples_daily_pinyin, pinyin_converter
from llmkit.generation import (continue_prompts, count_new_tokens, encode_prompts, generate_batch, generate_text,
                               generation_speed, run_generate)
from llmkit.loading import load_model, model_config
from llmkit.settings import EvalTask, FinetuneSettings, GenerateSettings, ModelSettings, TokenizerSettings
from llmkit.task_kinds import seq2seq
from llmkit.tokenizer import train_tokenizer

ROWS = [{"prompt": "今天天气很好", "response": "jin tian tian qi hen hao"},
        {"prompt": "好", "response": "hao"},
        {"prompt": "天气", "response": "tian qi"}]


@pytest.fixture(scope="module")
def tokenizer():
    settings = FinetuneSettings(task="seq2seq")
    return train_tokenizer(seq2seq.training_texts(settings, ROWS * 3), TokenizerSettings(vocab_size=200), "seq2seq")


def tiny_t5(tokenizer, seed: int = 0):
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = model_config(ModelSettings(arch="t5", n_layer=1, n_head=2, d_model=32, d_ff=64), tokenizer, "seq2seq")
    return T5ForConditionalGeneration(config).eval()


def test_sources_are_inputs_targets_are_labels_each_closed_by_the_end_token(tokenizer):
    features = seq2seq.encode(FinetuneSettings(task="seq2seq"), tokenizer, ROWS, {})
    first = features.rows[0]
    assert tokenizer.decode(first["input_ids"], skip_special_tokens=True) == "今天天气很好"
    assert first["input_ids"][-1] == first["labels"][-1] == tokenizer.eos_token_id
    assert len(first["labels"]) == len("jin tian tian qi hen hao") + 1
    assert features.truncated == 0


def test_collator_pads_inputs_with_pad_and_labels_with_minus_100(tokenizer):
    features = seq2seq.encode(FinetuneSettings(task="seq2seq"), tokenizer, ROWS, {}).rows
    model = tiny_t5(tokenizer)
    batch = seq2seq.collator(tokenizer)(features)
    longest_source, longest_target = max(len(f["input_ids"]) for f in features), max(len(f["labels"]) for f in features)
    assert batch["input_ids"].shape == (3, longest_source) and batch["labels"].shape == (3, longest_target)
    short = len(features[1]["labels"])
    assert (batch["labels"][1, short:] == -100).all() and (batch["labels"][1, :short] != -100).all()
    assert (batch["input_ids"][1, len(features[1]["input_ids"]):] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"][1].sum() == len(features[1]["input_ids"])
    assert model(**batch).loss.isfinite()


def test_truncation_is_counted(tokenizer):
    features = seq2seq.encode(FinetuneSettings(task="seq2seq", max_length=4), tokenizer, ROWS, {})
    assert features.truncated == 2 and all(len(f["labels"]) <= 4 for f in features.rows)


def test_t5_config_starts_the_decoder_from_pad_and_fits_only_seq2seq(tokenizer):
    from llmkit.errors import LlmkitError

    config = model_config(ModelSettings(arch="t5", n_layer=2, n_head=4, d_model=128), tokenizer, "seq2seq")
    assert (config.num_layers, config.num_decoder_layers, config.d_kv) == (2, 2, 32)
    assert config.decoder_start_token_id == config.pad_token_id == tokenizer.pad_token_id
    assert config.eos_token_id == tokenizer.eos_token_id and config.is_encoder_decoder
    with pytest.raises(LlmkitError, match="seq2seq"):
        model_config(ModelSettings(arch="t5"), tokenizer, "causal")
    with pytest.raises(LlmkitError, match="seq2seq"):
        model_config(ModelSettings(arch="llama"), tokenizer, "seq2seq")


def test_generation_of_an_encoder_decoder_returns_only_the_new_tokens(tokenizer):
    model = tiny_t5(tokenizer)
    settings = GenerateSettings(greedy=True, max_new_tokens=5, repetition_penalty=1.0)
    inputs = encode_prompts(tokenizer, ["今天天气很好", "好"], model.device, model=model)
    new_ids, _, _ = run_generate(model, tokenizer, inputs, settings)
    with torch.inference_mode():
        full = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert (full[:, 0] == model.config.decoder_start_token_id).all()
    assert torch.equal(new_ids, full[:, 1:])  # everything after the decoder's start token, prompt length aside
    single = generate_text(model, tokenizer, "今天天气很好", settings)
    assert single.text == tokenizer.decode(full[0, 1:], skip_special_tokens=True)
    assert single.new_tokens == count_new_tokens(full[:1, 1:], tokenizer)
    assert generate_batch(model, tokenizer, ["今天天气很好", "好"], settings) == [
        [tokenizer.decode(row, skip_special_tokens=True)] for row in full[:, 1:]]
    assert continue_prompts(model, tokenizer, ["好"], settings, seed=0) == [
        "好 → " + tokenizer.decode(full[1, 1:], skip_special_tokens=True)]
    assert generation_speed(model, tokenizer, "好", tokens=3, runs=1) > 0


def test_the_data_set_pairs_short_sentences_with_their_pinyin_and_splits_by_paragraph():
    assert pinyin_converter().get("今天天气很好") == ["jin", "tian", "tian", "qi", "hen", "hao"]
    train, test = peoples_daily_pinyin("train"), peoples_daily_pinyin("test")
    assert len(train) > 5 * len(test) > 10_000
    for row in train[:500] + test[:500]:
        assert set(row) == {"prompt", "response"} and len(row["prompt"]) <= MAX_PINYIN_CHARS
        assert len(row["response"].split()) == len(row["prompt"])  # one item per character
    assert peoples_daily_pinyin("test") == test  # fixed: the same rows every time
    assert len({row["prompt"] for row in test} & {row["prompt"] for row in train}) < 0.05 * len(test)


def test_baseline_spells_each_character_as_its_most_frequent_pinyin_and_copies_unknown_ones():
    settings = FinetuneSettings(task="seq2seq")
    train = [{"prompt": "行为", "response": "xing wei"}, {"prompt": "银行", "response": "yin hang"},
             {"prompt": "行", "response": "xing"}, {"prompt": "不对齐", "response": "x"}]
    assert seq2seq.character_dictionary(settings, train) == {"行": "xing", "为": "wei", "银": "yin"}
    test = [{"prompt": "行为", "response": "xing wei"}, {"prompt": "银行！", "response": "yin hang ！"}]
    metrics = seq2seq.baseline(settings, train, test)
    assert metrics["baseline_exact_match"] == 0.5  # 银行 reads "yin xing" by the dictionary
    assert {"baseline_chrf", "baseline_bleu"} <= set(metrics)


def test_a_tiny_t5_trains_from_scratch_and_reloads_and_its_report_holds_the_baseline(tmp_path, capsys):
    rows = peoples_daily_pinyin("train")[:120]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:8]))
    recipe = load_recipe("pinyin", [f"run.output_dir={tmp_path / 'runs'}", "run.name=t5",
                                    f"finetune.source={tmp_path / 'train.jsonl'}",
                                    f"finetune.test_source={tmp_path / 'test.jsonl'}", "model.n_layer=1",
                                    "model.d_model=32", "model.n_head=2", "model.d_ff=64", "train.max_steps=8",
                                    "train.eval_every=4", "train.batch_size=16", "train.log_every=1",
                                    "train.learning_rate=3e-3", "train.warmup_steps=0", "train.precision=fp32"])
    torch.manual_seed(0)
    start = finetune.run(recipe).run_dir
    history = [json.loads(line) for line in (start / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in history if "loss" in row and "eval_loss" not in row]
    assert losses[-1] < losses[0]
    final = json.loads((start / "final_metrics.json").read_text())
    assert {"exact_match", "chrf", "bleu", "baseline_exact_match", "baseline_chrf"} <= set(final["test"])
    model, tok = load_model(str(start))
    assert model.config.is_encoder_decoder and type(model).__name__ == "T5ForConditionalGeneration"
    fresh = tiny_t5(tok)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    # `llmkit eval` scores it as a seq2seq task; `llmkit generate` prints its output, not the prompt first
    task = EvalTask(kind="seq2seq", source=str(tmp_path / "test.jsonl"), split="all")
    scored = task_data.score(model, tok, task, task_data.task_rows(task), batch_size=4)
    assert scored["count"] == 8 and scored["exact_match"] == final["test"]["exact_match"]
    capsys.readouterr()
    generate.run(load_recipe(None, [f"generate.model={start}", "generate.max_new_tokens=6", "generate.greedy=true"]),
                 prompt="今天天气很好")
    printed = capsys.readouterr().out
    expected = generate_text(model, tok, "今天天气很好", GenerateSettings(greedy=True, max_new_tokens=6)).text
    assert printed == expected + "\n" and "今天天气很好" not in printed
    # continues from model.path: the weights it starts from are the saved ones
    again = load_recipe("pinyin", [f"run.output_dir={tmp_path / 'runs'}", "run.name=t5b", f"model.path={start}",
                                   f"finetune.source={tmp_path / 'train.jsonl'}", 'finetune.test_source=""',
                                   "train.max_steps=1", "train.eval_every=1", "train.batch_size=16",
                                   "train.precision=fp32", "train.learning_rate=1e-9", "train.warmup_steps=0"])
    continued, _ = load_model(str(finetune.run(again).run_dir))
    shared = model.state_dict()["shared.weight"]
    assert torch.allclose(continued.state_dict()["shared.weight"], shared, atol=1e-5)
