"""A time budget for pretraining (train.max_minutes, llmkit/budget.py): the step count it lays the run out
over, measured without touching the model or the run's random draws, recorded, and kept on resume."""

import pytest
import torch
from safetensors.torch import load_file

from llmkit import budget, load_recipe, pretrain
from llmkit.errors import LlmkitError
from llmkit.loading import build_model
from llmkit.tokenizer import train_tokenizer
from tests.conftest import interrupted_at

pytestmark = pytest.mark.slow


def run_tiny(overrides, *more, **kwargs):
    return pretrain.run(load_recipe("pretrain-zh-tiny", [*overrides, *more]), **kwargs)


def trained_steps(run_dir) -> int:
    return load_recipe(run_dir / "recipe.toml").train.max_steps


@pytest.mark.parametrize("minutes, per_step, ceiling, steps", [
    (4, 0.1, 100_000, 2400),  # as many as fit
    (4, 0.1, 1000, 1000),  # train.max_steps is a ceiling
    (0.001, 5.0, 1000, 1),  # at least one
])
def test_steps_within(minutes, per_step, ceiling, steps):
    assert budget.steps_within(minutes, per_step, ceiling) == steps


def test_seconds_per_step_measures_a_copy(tiny):
    recipe = load_recipe("pretrain-zh-tiny", tiny)
    tokenizer = train_tokenizer(["今天天气很好。", "中国人民银行"] * 20, recipe.tokenizer, "causal")
    model = build_model(recipe, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"input_ids": torch.randint(0, len(tokenizer), (4, 16))}
    batch["labels"] = batch["input_ids"]
    seconds = budget.seconds_per_step(model, [batch], recipe.train, torch.float32, "cpu")
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_run_takes_the_steps_that_fit_and_records_them(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "seconds_per_step", lambda *args: 1.5)  # 6 s / 1.5 s = 4 steps
    result = run_tiny(tiny, "train.max_minutes=0.1", "train.max_steps=1000")
    assert trained_steps(result.run_dir) == 4
    assert '"step": 4' in (result.run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    assert "time budget 0.1 min: 1.500 s per step measured here, 4 steps" in capsys.readouterr().err


def test_a_budget_changes_nothing_but_the_step_count(tiny, tmp_path):
    """The measurement trains a copy with its own random draws: a budget that allows the ceiling ends
    with the weights of the same run without a budget."""
    plain = run_tiny([*tiny, "run.name=plain"], "train.max_minutes=0")
    budgeted = run_tiny([*tiny, "run.name=budgeted"], "train.max_minutes=60")
    assert trained_steps(budgeted.run_dir) == trained_steps(plain.run_dir) == 6
    a, b = load_file(plain.run_dir / "model.safetensors"), load_file(budgeted.run_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_its_recorded_count(tiny, tmp_path, monkeypatch):
    steps = ["train.max_minutes=0.1", "train.max_steps=1000", "train.save_every=2", "train.eval_every=2"]
    monkeypatch.setattr(budget, "seconds_per_step", lambda *args: 1.0)  # 6 steps
    with interrupted_at(monkeypatch, 2):
        run_tiny(tiny, *steps)
    monkeypatch.setattr(budget, "seconds_per_step", lambda *args: 0.1)  # this machine got faster: 60 steps
    result = run_tiny(tiny, *steps, resume=True)
    assert trained_steps(result.run_dir) == 6
    assert '"step": 6' in (result.run_dir / "metrics.jsonl").read_text().splitlines()[-1]


def test_a_budget_and_epochs_are_refused_together():
    with pytest.raises(LlmkitError, match=r"train.max_minutes \(4\) and train.epochs \(1\) both say"):
        load_recipe("pretrain-zh-tiny", ["train.max_minutes=4", "train.epochs=1"])
