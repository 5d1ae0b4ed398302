"""End-to-end pretraining on tiny models: outputs, resume, refusal to overwrite, bad input (several
processes: test_distributed).
Covers llmkit/pretrain.py, the Trainer callbacks of llmkit/callbacks.py (progress lines, metrics file,
Ctrl-C), the loss curve and model card of llmkit/report.py, and `python -m llmkit` (llmkit/__main__.py,
llmkit/__init__.py)."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llmkit import load_recipe, pretrain
from llmkit.errors import LlmkitError
from tests.conftest import interrupted_at

pytestmark = pytest.mark.slow
LLMKIT = [sys.executable, "-m", "llmkit"]


def run_tiny(overrides, *more, **kwargs):
    return pretrain.run(load_recipe("pretrain-zh-tiny", [*overrides, *more]), **kwargs)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class InitialWeights(TrainerCallback):
    """Keeps a copy of the model's weights as training begins (after initialisation)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_trained(run_dir: Path, initial: dict) -> None:
    """The saved model is not the initial one, and the losses fell: the model learned from the data."""
    saved = load_file(run_dir / "model.safetensors")
    blocks = [k for k in saved if ".layers." in k or ".h." in k]  # every transformer-layer tensor got gradients
    assert blocks and all(not torch.equal(saved[k], initial[k]) for k in blocks)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    assert len(losses) == 6 and losses[0] > losses[-1]  # step 1's loss is measured before any update
    # A model that learns nothing keeps its evaluation loss (same weights, same validation blocks).
    vocab = json.loads((run_dir / "config.json").read_text())["vocab_size"]
    assert len(evals) == 2 and evals[1] < evals[0] < math.log(vocab)


def test_causal_run_saves_a_model_plain_transformers_loads_and_generates(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    initial = InitialWeights()
    result = run_tiny(tiny, callbacks=[initial])
    run_dir = tmp_path / "runs" / "tiny"
    assert_trained(run_dir, initial.weights)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "recipe.toml",
                 "provenance.json", "README.md", "final_metrics.json"):
        assert (run_dir / name).is_file(), name
    assert (tmp_path / "runs" / "latest").resolve() == run_dir.resolve()
    assert len(json.loads((run_dir / "provenance.json").read_text())["data_fingerprint"]) == 64
    evals = [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in row]
    assert [row["step"] for row in evals] == [3, 6]
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    output = model.generate(**tokenizer("昨天天气很", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert output.shape[1] == len("昨天天气很") + 1 + 4  # <s> + prompt + new tokens
    assert result.samples and result.samples[0].startswith("昨天天气很")


def test_loss_per_char_matches_a_direct_computation(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.data import load_text_splits, texts

    result = run_tiny(tiny)
    run_dir = tmp_path / "runs" / "tiny"
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    validation = list(texts(load_text_splits(load_recipe("pretrain-zh-tiny", tiny).data).validation))
    stream = [t for doc in validation for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = torch.tensor(stream[: len(stream) // 32 * 32]).view(-1, 32)
    with torch.no_grad():
        mean_nll = model(input_ids=blocks, labels=blocks).loss.item()
    direct = mean_nll * len(stream) / sum(len(doc) + 1 for doc in validation)
    assert result.metrics["eval_loss_per_char"] == pytest.approx(direct, rel=1e-4)


def test_masked_lm_run_loads_as_masked_lm(tiny, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    run_tiny(tiny, "model.arch=bert", "train.objective=mlm")
    run_dir = tmp_path / "runs" / "tiny"
    model = AutoModelForMaskedLM.from_pretrained(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    inputs = tokenizer(f"昨天{tokenizer.mask_token}气很好", return_tensors="pt")
    assert model(**inputs).logits.shape[-1] == len(tokenizer)


def test_gpt2_architecture_trains(tiny, tmp_path):
    initial = InitialWeights()
    run_tiny(tiny, "model.arch=gpt2", callbacks=[initial])
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "config.json").read_text())["model_type"] == "gpt2"
    assert_trained(run_dir, initial.weights)


def test_existing_run_is_refused_and_left_untouched(tiny, tmp_path):
    run_tiny(tiny)
    run_dir = tmp_path / "runs" / "tiny"
    before = snapshot(run_dir)
    with pytest.raises(LlmkitError, match="exists; pass --overwrite"):
        run_tiny(tiny)
    assert snapshot(run_dir) == before


def test_overwrite_replaces_the_run(tiny, tmp_path):
    run_tiny(tiny)
    marker = tmp_path / "runs" / "tiny" / "old-file"
    marker.write_text("old")
    run_tiny(tiny, overwrite=True)
    assert not marker.exists() and (tmp_path / "runs" / "tiny" / "model.safetensors").exists()
    # The card, written while the new run stood aside, tells how to load it from where it is now.
    card = (tmp_path / "runs" / "tiny" / "README.md").read_text(encoding="utf-8")
    assert f'from_pretrained("{tmp_path / "runs" / "tiny"}")' in card and ".incoming" not in card


def test_resume_after_interrupt_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    steps = ["train.max_steps=8", "train.save_every=4", "train.eval_every=4"]
    whole = run_tiny([*tiny, "run.name=whole"], *steps)

    with interrupted_at(monkeypatch, 5):
        run_tiny([*tiny, "run.name=parts"], *steps)
    assert (tmp_path / "runs" / "parts" / "checkpoints" / "checkpoint-5").is_dir()
    resumed = run_tiny([*tiny, "run.name=parts"], *steps, resume=True)

    assert resumed.metrics["eval_loss"] == pytest.approx(whole.metrics["eval_loss"], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "parts").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_resume_without_a_checkpoint_is_refused(tiny):
    with pytest.raises(LlmkitError, match="no checkpoint to resume from"):
        run_tiny(tiny, resume=True)


def test_ctrl_c_leaves_a_resumable_checkpoint(tiny, tmp_path):
    overrides = [arg for o in [*tiny, "train.max_steps=500", "train.save_every=1000"] for arg in ("--set", o)]
    process = subprocess.Popen([*LLMKIT, "pretrain", "pretrain-zh-tiny", *overrides], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    progress = []
    for line in process.stderr:  # wait until training is under way (progress is on stderr)
        progress.append(line)
        if line.startswith("step 2/"):
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    stderr = "".join(progress) + rest
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    checkpoints = list((tmp_path / "runs" / "tiny" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "optimizer.pt").exists()


@pytest.mark.parametrize("overrides, message", [
    (["data.block_size=128", "model.max_positions=64"], "data.block_size (128) is larger than the model's positions"),
    (["data.streaming=true", "train.epochs=1", "train.max_minutes=0"], "data.streaming reads a corpus of unknown length"),
    (["tokenizer.vocab_size=20"], "tokenizer.vocab_size = 20 is too small"),
    (["data.source=missing.txt"], "data source not found: missing.txt"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny, tmp_path, overrides, message):
    args = [arg for o in [*tiny, *overrides] for arg in ("--set", o)]
    result = subprocess.run([*LLMKIT, "pretrain", "pretrain-zh-tiny", *args], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_bad_data_line_is_named_and_existing_run_kept(tiny, tmp_path):
    run_tiny(tiny)
    before = snapshot(tmp_path / "runs" / "tiny")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "今天天气很好"}\n{"text": "好"}\nnot json\n', encoding="utf-8")
    args = [arg for o in [*tiny, f"data.source={data}"] for arg in ("--set", o)]
    result = subprocess.run([*LLMKIT, "pretrain", "pretrain-zh-tiny", *args, "--overwrite"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and f"{data}:3: not a JSON object" in result.stderr
    assert snapshot(tmp_path / "runs" / "tiny") == before


def test_empty_data_is_refused(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(LlmkitError, match="holds no text"):
        run_tiny(tiny, f"data.source={empty}")


def test_validation_shorter_than_a_block_is_refused_before_writing(tiny, tmp_path):
    with pytest.raises(LlmkitError, match="shorter than one block"):
        run_tiny(tiny, "data.block_size=512", "model.max_positions=512", "data.validation_fraction=0.01")
    assert not (tmp_path / "runs").exists()


def test_continued_pretraining_starts_from_the_saved_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run_tiny(tiny)
    base = tmp_path / "runs" / "tiny"
    continued = run_tiny([*tiny, "run.name=continued", f"model.path={base}", "train.max_steps=1",
                          "train.learning_rate=1e-9", "train.warmup_steps=0"])
    first = AutoModelForCausalLM.from_pretrained(base).state_dict()
    second = AutoModelForCausalLM.from_pretrained(continued.run_dir).state_dict()
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)
    assert (continued.run_dir / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()


# data.streaming

STREAMED = ["data.streaming=true", "data.validation_documents=100"]


def test_streamed_run_trains_without_reading_the_corpus_to_its_end(tiny, tmp_path):
    """The corpus ends in a line that is not JSON, which reading it whole refuses (test_data): a streamed run of
    6 steps never gets there. It learns, and records that its training data was streamed."""
    from llmkit.corpora import peoples_daily

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": row["text"]}, ensure_ascii=False) + "\n" for row in peoples_daily()[:5000])
                      + "{not json\n", encoding="utf-8")
    initial = InitialWeights()
    run_tiny(tiny, *STREAMED, f"data.source={corpus}", "data.max_documents=0", "tokenizer.train_documents=300",
             callbacks=[initial])
    run_dir = tmp_path / "runs" / "tiny"
    assert_trained(run_dir, initial.weights)
    assert "streamed training" in (run_dir / "README.md").read_text(encoding="utf-8")
    assert "baseline_ngram_loss_per_char" not in json.loads((run_dir / "final_metrics.json").read_text())


def test_streamed_resume_after_interrupt_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    """Resuming a stream skips the batches already trained on: the same model as one run through."""
    from transformers import AutoModelForCausalLM

    steps = [*STREAMED, "train.max_steps=8", "train.save_every=4", "train.eval_every=4"]
    whole = run_tiny([*tiny, "run.name=whole"], *steps)
    with interrupted_at(monkeypatch, 5):
        run_tiny([*tiny, "run.name=parts"], *steps)
    resumed = run_tiny([*tiny, "run.name=parts"], *steps, resume=True)

    assert resumed.metrics["eval_loss"] == pytest.approx(whole.metrics["eval_loss"], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "parts").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
