"""Shared fixtures: tiny recipes (a few hundred documents, a model of a few thousand parameters)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

# llmkit's own progress on stderr (results go to stdout): the setup line, training and evaluation steps,
# samples, resuming, and the notice of a first Ctrl-C/SIGTERM. Anything else on stderr is a problem or noise.
PROGRESS = re.compile(r"(model: \w+, .* parameters|\w[\w-]* by \w[\w-]*: .* parameters|step \d+/\d+  loss |"
                      r"step \d+: eval loss |  sample: |time budget [\d.]+ min: |\d+ tasks, one \w+ encoder |  [\w.-]+: [\w-]+ on .*, [\d,]+ training / |resuming (from|with changed) |skipping .*: incomplete|"
                      r"\n?SIG(INT|TERM): saving a checkpoint after this step)")


def problems(stderr: str) -> list[str]:
    """The lines of stderr that are not llmkit's own progress."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS.match(line)]


# Runs in tests must never reach the network (there is none here) nor a shared cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = [
    "data.max_documents=300",
    "data.block_size=32",
    "tokenizer.vocab_size=2000",
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=32",
    "model.d_ff=64",
    "model.max_positions=64",
    "train.max_steps=6",
    "train.batch_size=8",
    "train.eval_every=3",
    "train.save_every=3",
    "train.log_every=1",
    "train.eval_batch_size=16",
    "generate.max_new_tokens=5",
    "train.precision=fp32",  # the same numbers on every CPU (auto picks bf16 where it is native: test_precision)
]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path_factory.getbasetemp() / "llmkit-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (two threads spin-wait for each other on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path) -> list[str]:
    """Overrides that turn the quickstart recipe into a seconds-long run under tmp_path."""
    return TINY + [f"run.output_dir={tmp_path / 'runs'}", "run.name=tiny"]


@pytest.fixture
def recipe_file(tmp_path):
    """Write a recipe file into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def wait_until(condition, seconds: float = 60, every: float = 0.01) -> None:
    """Check `condition` every `every` seconds until it holds; the test fails if it does not within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out: not true within {seconds:g} s"
        time.sleep(every)


def char_tokenizer(objective: str = "causal"):
    """A character tokenizer trained on 200 documents of the built-in corpus."""
    return trained_tokenizer(objective, kind="char", vocab_size=2000)


def bpe_tokenizer(objective: str = "causal"):
    """A byte-level BPE tokenizer of 600 tokens trained on 200 documents of the built-in corpus."""
    return trained_tokenizer(objective, kind="bpe", vocab_size=600)


def trained_tokenizer(objective: str, **settings):
    from llmkit.corpora import peoples_daily
    from llmkit.settings import TokenizerSettings
    from llmkit.tokenizer import train_tokenizer

    documents = [row["text"] for row in peoples_daily()[:200]]
    return train_tokenizer(documents, TokenizerSettings(**settings), objective)


def save_tiny_model(path: Path, model_class: str, tokenizer, d_model: int = 32, **config) -> Path:
    """A randomly initialised model of a few thousand parameters, saved with its tokenizer.

    model_class: a transformers class name (LlamaForCausalLM, BertForSequenceClassification, ...)."""
    import torch
    import transformers

    arch = "bert" if model_class.startswith("Bert") else "llama"
    config_class = transformers.BertConfig if arch == "bert" else transformers.LlamaConfig
    settings = config_class(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                            pad_token_id=tokenizer.pad_token_id, **config)
    if arch == "llama":
        settings.num_key_value_heads = 2
        settings.bos_token_id, settings.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    getattr(transformers, model_class)(settings).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def interrupted_at(monkeypatch, step: int):
    """Within it, training stops after `step` as on Ctrl-C (a checkpoint saved, then llmkit's Interrupted,
    which it expects); after it, training runs to its end again."""
    from llmkit.errors import Interrupted
    from llmkit.training import StopOnInterrupt

    original = StopOnInterrupt.on_step_end

    def interrupt(self, args, state, control, **kwargs):
        if state.global_step == step:
            self.handle(signal.SIGINT, None)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnInterrupt, "on_step_end", interrupt)
    with pytest.raises(Interrupted, match="--resume"):
        yield
    monkeypatch.setattr(StopOnInterrupt, "on_step_end", original)
