"""Value checks of the recipe settings: every number has a range, NaN and inf fit none, names are checked."""

import dataclasses
import math
import typing

import pytest

from llmkit import settings
from llmkit.errors import LlmkitError
from llmkit.recipe import load_recipe
from llmkit.settings import INT_MAX, Range
from llmkit.tasks import FINETUNE_TASKS, selection_metrics


def settings_classes() -> list[type]:
    """Every settings dataclass a recipe holds, nested ones (quantize.task, eval.tasks) included."""
    found, todo = [], [settings.Recipe]
    while todo:
        cls = todo.pop()
        for hint in typing.get_type_hints(cls).values():
            nested = (typing.get_args(hint) or (hint,))[0]
            if dataclasses.is_dataclass(nested) and nested not in found:
                found.append(nested)
                todo.append(nested)
    return found


NUMERIC_FIELDS = [(cls, name, hint) for cls in settings_classes()
                  for name, hint in typing.get_type_hints(cls).items() if hint in (int, float)]


def check(instance) -> None:
    if isinstance(instance, settings.TaskEntry):  # a [[finetune.tasks]] table must name its data
        instance = dataclasses.replace(instance, source=instance.source or "data.jsonl")
    instance.check(*(["where"] if isinstance(instance, (settings.EvalTask, settings.TaskEntry)) else []))


@pytest.mark.parametrize("cls, name, hint", NUMERIC_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in NUMERIC_FIELDS])
def test_every_numeric_setting_has_a_range_that_its_default_fits(cls, name, hint):
    assert name in cls.RANGES, f"{cls.__name__}.{name} has no entry in {cls.__name__}.RANGES"
    check(cls())


@pytest.mark.parametrize("cls, name, hint", NUMERIC_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in NUMERIC_FIELDS])
def test_every_numeric_setting_refuses_what_is_outside_its_range(cls, name, hint):
    allowed = cls.RANGES[name]
    if hint is int:
        assert allowed.high < 2**32, "an integer setting needs an upper bound"
    bad = [allowed.low - 1, allowed.high + 1] if hint is int else [math.nan, math.inf, -math.inf, allowed.low - 1]
    for value in bad:
        with pytest.raises(LlmkitError, match=rf"\.{name} must be .*, got {value}$"):
            check(dataclasses.replace(cls(), **{name: value}))


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=nan", "train.learning_rate must be a finite number > 0, got nan"),
    ("train.learning_rate=inf", "train.learning_rate must be a finite number > 0, got inf"),
    ("train.learning_rate=0", "train.learning_rate must be a finite number > 0, got 0.0"),
    ("train.max_grad_norm=nan", "train.max_grad_norm must be a finite number >= 0, got nan"),
    ("train.adam_beta2=7", "train.adam_beta2 must be in [0, 1), got 7.0"),
    ("train.adam_beta2=1", "train.adam_beta2 must be in [0, 1), got 1.0"),
    ("train.weight_decay=-5", "train.weight_decay must be a finite number >= 0, got -5.0"),
    ("train.max_steps=100000000000000000000000",
     "train.max_steps must be in [1, 2147483647], got 100000000000000000000000"),
    ("train.max_steps=0", "train.max_steps must be in [1, 2147483647], got 0"),
    ("train.warmup_steps=-inf", "train.warmup_steps must be in [0, 2147483647], got -inf"),
    ("train.epochs=nan", "train.epochs must be in [0, 2147483647], got nan"),
    ("train.eval_every=-1", "train.eval_every must be in [0, 2147483647], got -1"),
    ("train.dataloader_workers=-1", "train.dataloader_workers must be in [0, 1024], got -1"),
    ("run.seed=-1", "run.seed must be in [0, 4294967295], got -1"),
    ("run.seed=4294967296", "run.seed must be in [0, 4294967295], got 4294967296"),
    ("model.rope_theta=nan", "model.rope_theta must be a finite number > 0, got nan"),
    ("model.d_ff=-1", "model.d_ff must be in [0, 2147483647], got -1"),
    ("generate.temperature=inf", "generate.temperature must be a finite number >= 0, got inf"),
    ("distill.alpha=nan", "distill.alpha must be in [0, 1], got nan"),
    ("quantize.int8_threshold=-1", "quantize.int8_threshold must be a finite number >= 0, got -1.0"),
    ("quantize.task.stride=-1", "quantize.task.stride must be in [0, 2147483647], got -1"),
    ('eval.tasks=[{validation_fraction = nan}]', "eval.tasks[0].validation_fraction must be in (0, 1), got nan"),
])
def test_recipe_values_out_of_range_are_refused_naming_the_key(override, message):
    with pytest.raises(LlmkitError) as error:
        load_recipe(None, [override])
    assert str(error.value) == message


def test_values_at_the_ends_of_their_ranges_are_accepted():
    recipe = load_recipe(None, ["train.adam_beta2=0", "train.max_grad_norm=0", "train.min_lr_ratio=1",
                                "train.max_steps=2147483647", "run.seed=4294967295", "generate.top_p=1"])
    assert recipe.train.max_steps == INT_MAX and recipe.run.seed == 2**32 - 1


def test_a_float_too_large_for_an_integer_setting_is_a_type_error():
    with pytest.raises(LlmkitError, match=r"--set train.max_steps=1e23: train.max_steps must be an integer, got 1e\+23"):
        load_recipe(None, ["train.max_steps=1e23"])


def test_range_reads_as_its_interval():
    assert str(Range(0, 1, open_high=True)) == "in [0, 1)"
    assert str(Range(0, 1, open_low=True)) == "in (0, 1]"
    assert str(Range(0, open_low=True)) == "a finite number > 0"
    assert 0 in Range(0) and 0 not in Range(0, open_low=True) and 1 not in Range(0, 1, open_high=True)
    assert math.nan not in Range(-math.inf) and math.inf not in Range(0) and 10**400 not in Range(0, INT_MAX)


# ---------------------------------------------------------------- finetune.metric


def test_every_finetune_metric_is_one_the_task_reports():
    """The names come from what the tasks' scorers return (llmkit.metrics) plus the Trainer's loss; the
    first is the one a run selects by when the recipe names none."""
    from llmkit.metrics import classification_metrics, entity_metrics, squad_metrics
    from llmkit.settings import EvalTask
    from llmkit.task_kinds.image_text import measures

    captions = ["一个红色的圆在左边", "一个蓝色的星形在中间"]
    questions = [{"image": "a", "question": "图中有几个圆？", "answer": "一个", "attribute": "count"}]

    reported = {
        "classification": classification_metrics(["a", "b"], ["a", "a"], labels=["a", "b"]),
        "token-classification": entity_metrics([["B-PER", "O"]], [["B-PER", "O"]]),
        "extractive-qa": squad_metrics(["x"], ["x"]),
        "causal-lm": {},  # validation is the loss only
        "seq2seq": {},  # likewise: generating at every evaluation is too slow
        "caption": measures([{}, {}], captions, captions, EvalTask(kind="caption")),
        "vqa": measures(questions, ["一个"], ["一个"], EvalTask(kind="vqa")),
    }
    DEFAULT_METRIC = {"classification": "accuracy", "token-classification": "f1", "extractive-qa": "f1",
                      "causal-lm": "loss", "seq2seq": "loss", "caption": "chrf", "vqa": "exact_match"}
    FINETUNE_METRICS = {task: selection_metrics(task) for task in FINETUNE_TASKS}
    assert set(FINETUNE_METRICS) == set(reported)
    for task, metrics in FINETUNE_METRICS.items():
        numbers = {key for key, value in reported[task].items() if isinstance(value, float)} | {"loss"}
        assert set(metrics) <= numbers, task
        assert metrics[0] == DEFAULT_METRIC[task]


@pytest.mark.parametrize("task, metric, message", [
    ("classification", "acuracy", "finetune.metric 'acuracy' is not a metric of task 'classification' "
                                  "(did you mean 'accuracy'?) (expected one of: accuracy, f1, precision, recall, loss)"),
    ("classification", "exact_match", "finetune.metric 'exact_match' is not a metric of task 'classification' "
                                      "(expected one of: accuracy, f1, precision, recall, loss)"),
    ("causal-lm", "accuracy", "finetune.metric 'accuracy' is not a metric of task 'causal-lm' (expected one of: loss)"),
    ("extractive-qa", "eval_exact_mach", "finetune.metric 'eval_exact_mach' is not a metric of task 'extractive-qa' "
                                         "(did you mean 'exact_match'?) (expected one of: f1, exact_match, loss)"),
])
def test_a_metric_the_task_does_not_report_is_refused(task, metric, message):
    with pytest.raises(LlmkitError) as error:
        load_recipe(None, [f"finetune.task={task}", f"finetune.metric={metric}"])
    assert str(error.value) == message


def test_metrics_the_task_reports_are_accepted_also_with_the_eval_prefix():
    assert load_recipe(None, ["finetune.task=extractive-qa", "finetune.metric=exact_match"]).finetune.metric
    assert load_recipe(None, ["finetune.metric=eval_f1"]).finetune.metric == "eval_f1"
