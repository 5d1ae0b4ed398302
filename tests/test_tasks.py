"""The task table (llmkit/tasks.py): every entry is complete and consistent, so that a task is
defined in one place. The task modules themselves are tested by tests/test_task_data.py (rows, features,
collators) and tests/test_evaluate.py (scorers)."""

import typing

import pytest
import transformers

from llmkit import settings, task_data, tasks

FINE_TUNING_FUNCTIONS = ("prepare_row", "encode", "collator", "training_texts")


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_has_a_head_transformers_knows_and_the_functions_it_needs(name):
    task = tasks.TASKS[name]
    module = task_data.implementation(name)
    assert hasattr(transformers, tasks.HEADS[task.head].auto_class)
    scorer = task_data.implementation(tasks.scorer_of(name))
    assert callable(scorer.score) and not tasks.TASKS[tasks.scorer_of(name)].scored_as
    if task.fine_tunable:
        assert all(callable(getattr(module, function)) for function in FINE_TUNING_FUNCTIONS), name
    if task.has_labels:
        assert callable(module.labels_of) and callable(module.label_order), name


def test_the_recipe_vocabulary_is_the_table():
    hints = typing.get_type_hints(settings.EvalTask) | typing.get_type_hints(settings.FinetuneSettings)
    assert typing.get_args(hints["kind"]) == tasks.EVAL_KINDS == tuple(
        name for name, task in tasks.TASKS.items() if not task.scored_as)
    assert typing.get_args(hints["task"]) == tasks.FINETUNE_TASKS == (
        "classification", "token-classification", "extractive-qa", "causal-lm", "seq2seq", "caption", "vqa")


def test_columns_read_follow_the_settings_and_skip_an_unset_optional_one():
    task = settings.EvalTask(kind="classification", text_column="review", label_column="stars")
    assert tasks.columns_of("classification", task) == (["review", "stars"], 1)
    paired = settings.EvalTask(kind="classification", text_pair_column="hypothesis")
    assert tasks.columns_of("classification", paired) == (["text", "label", "hypothesis"], 1)
    assert tasks.columns_of("extractive-qa", settings.EvalTask()) == (["context", "question", "answers"], 2)
    assert tasks.columns_of("causal-lm", settings.FinetuneSettings(task="causal-lm")) == ([], 0)


def test_a_fine_tuned_model_is_scored_by_a_task_eval_knows_and_selected_by_what_it_reports():
    for name in tasks.FINETUNE_TASKS:
        assert tasks.scorer_of(name) in tasks.EVAL_KINDS
        assert set(tasks.TASKS[name].select_by) <= set(tasks.TASKS[tasks.scorer_of(name)].headline) | {
            "precision", "recall"}
        assert tasks.selection_metrics(name)[-1] == "loss"
