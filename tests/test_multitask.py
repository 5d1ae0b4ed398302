"""Multi-task learning (llmkit/multitask.py, and `llmkit finetune` with [[finetune.tasks]]): batches of one
task each, drawn with the tasks' probabilities and reproducible per epoch; one encoder shared by every
task's model and saved once per task as a plain transformers model; a run that trains classification,
tagging and QA together, lowers each task's loss, keeps what it scored, and resumes as if never stopped;
bad multi-task recipes refused."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from llmkit import finetune, load_recipe
from llmkit.cli import app
from llmkit.loading import load_model
from llmkit.multitask import SharedEncoderModel, TaskBatches, TaskCollator, TaskRows, task_probabilities
from llmkit.task_data import eval_task, load_task_data, score
from llmkit.tasks import TASKS as TASK_TABLE
from tests.conftest import char_tokenizer, problems, interrupted_at
from tests.test_finetune import read_jsonl, task_rows, write_jsonl

runner = CliRunner()
CLASSES = {"classification": "BertForSequenceClassification", "token-classification": "BertForTokenClassification",
           "extractive-qa": "BertForQuestionAnswering"}
TASKS = {"sentiment": "classification", "entities": "token-classification", "qa": "extractive-qa"}
AUTO = {"classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "extractive-qa": transformers.AutoModelForQuestionAnswering}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- batches


def test_task_probabilities_follow_the_sizes_at_1_and_even_out_as_the_temperature_rises():
    assert task_probabilities([300, 100], 1.0) == pytest.approx([0.75, 0.25])
    assert task_probabilities([300, 100], 2.0) == pytest.approx([3 ** 0.5 / (3 ** 0.5 + 1), 1 / (3 ** 0.5 + 1)])
    assert task_probabilities([300, 100], 100.0)[0] == pytest.approx(0.5, abs=0.01)


def lengths(*sizes: int) -> list[list[int]]:
    return [[1 + (i * 7) % 13 for i in range(size)] for size in sizes]


def test_each_batch_holds_one_task_and_the_tasks_come_in_proportion():
    sizes = [600, 200]
    batches = TaskBatches(lengths(*sizes), 4, task_probabilities(sizes, 1.0), seed=3)
    drawn = list(batches)
    assert len(drawn) == len(batches) == 200  # as many as the tasks fill: 150 + 50
    tasks = [0 if max(batch) < 600 else 1 for batch in drawn]
    assert all((min(batch) >= 600) == bool(task) for batch, task in zip(drawn, tasks))  # never two tasks in one
    assert Counter(tasks)[1] / len(tasks) == pytest.approx(0.25, abs=0.08)
    assert all(len(batch) <= 4 for batch in drawn)


def test_a_task_batch_groups_similar_lengths_and_a_task_that_runs_out_starts_over():
    rows = lengths(40, 400)
    batches = list(TaskBatches(rows, 4, [0.5, 0.5], seed=0))  # the small task is drawn ~55 times: ~5 passes
    small = [batch for batch in batches if max(batch) < 40]
    assert len(small) > 10
    seen = Counter(index for batch in small for index in batch)
    assert set(seen) == set(range(40))  # every example of each pass, none lost
    spread = [max(rows[0][i] for i in batch) - min(rows[0][i] for i in batch) for batch in small if len(batch) == 4]
    assert sum(spread) / len(spread) < 4  # lengths 1..13 at random would spread ~8 within a batch


def test_batches_are_the_same_for_a_seed_and_epoch_and_change_with_the_epoch():
    def epoch(number: int, seed: int = 1) -> list[list[int]]:
        batches = TaskBatches(lengths(50, 30), 4, [0.6, 0.4], seed=seed)
        batches.set_epoch(number)
        return list(batches)

    assert epoch(2) == epoch(2)
    assert epoch(2) != epoch(3)
    assert epoch(2) != epoch(2, seed=2)


def test_evaluation_batches_visit_every_row_once_in_order():
    batches = list(TaskBatches(lengths(10, 7), 4, shuffle=False))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15, 16]]


def test_the_collator_pads_with_the_batchs_task_and_names_it():
    tokenizer = char_tokenizer("mlm")
    rows = TaskRows({"a": [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1}],
                     "b": [{"input_ids": [5], "attention_mask": [1], "labels": [0]}]})
    collate = TaskCollator({"a": transformers.DataCollatorWithPadding(tokenizer),
                            "b": transformers.DataCollatorForTokenClassification(tokenizer)})
    batch = collate([rows[0]])
    assert batch["task"] == "a" and batch["labels"].tolist() == [1] and batch["input_ids"].shape == (1, 3)
    assert rows.lengths == [[3], [1]]


# ---------------------------------------------------------------- the shared encoder


def task_models(order: list[str]) -> dict:
    tokenizer = char_tokenizer("mlm")
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return {name: AUTO[TASKS[name]].from_config(config) for name in order}


def test_every_task_reads_one_encoder_stored_once_even_when_the_first_task_has_no_pooler():
    model = SharedEncoderModel(task_models(["entities", "sentiment", "qa"]))
    assert all(m.base_model is model.encoder for m in model.task_models.values())
    assert model.encoder.pooler is not None  # the classifier needs it; the tagger's own encoder had none
    names = list(model.state_dict())
    assert sum(name.startswith("encoder.") for name in names) == len(model.encoder.state_dict())
    assert all(name.startswith(("encoder.", "heads.")) for name in names)
    inputs = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert model(task="sentiment", **inputs).logits.shape == (1, 2)
    assert model(task="entities", **inputs).logits.shape == (1, 4, 2)


def test_decoders_share_too_whatever_their_classes_call_the_backbone():
    # LlamaForSequenceClassification keeps its backbone as .model, LlamaForQuestionAnswering as .transformer
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, pad_token_id=0)
    model = SharedEncoderModel({"sentiment": transformers.LlamaForSequenceClassification(config),
                                "qa": transformers.LlamaForQuestionAnswering(config)})
    assert model.task_models["qa"].transformer is model.task_models["sentiment"].model is model.encoder
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert model(task="qa", start_positions=torch.tensor([1]), end_positions=torch.tensor([2]), **inputs).loss > 0
    assert sorted(model.heads["qa"]) == ["qa_outputs"] and sorted(model.heads["sentiment"]) == ["score"]


def test_a_step_on_one_task_moves_the_encoder_that_the_other_task_reads():
    model = SharedEncoderModel(task_models(["sentiment", "entities"]))
    inputs = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    model.eval()
    before = model.task_models["sentiment"](**inputs).logits.detach().clone()
    tagger_head = model.heads["entities"]["classifier"].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(task="entities", labels=torch.tensor([[0, 1, 1, 0]]), **inputs).loss.backward()
    optimizer.step()
    after = model.task_models["sentiment"](**inputs).logits
    assert not torch.allclose(before, after)  # the classifier's head did not move: its encoder did
    assert not torch.equal(tagger_head, model.heads["entities"]["classifier"].weight)


def test_each_task_saves_as_its_own_transformers_model_with_the_shared_weights(tmp_path):
    model = SharedEncoderModel(task_models(["sentiment", "entities"]))
    for name in ("sentiment", "entities"):
        model.save(name, tmp_path / name)
    tagger = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "entities")
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "sentiment")
    assert type(tagger).__name__ == "BertForTokenClassification"
    assert type(classifier).__name__ == "BertForSequenceClassification"
    shared = model.encoder.state_dict()
    for loaded in (tagger, classifier):
        for key, value in loaded.bert.state_dict().items():
            torch.testing.assert_close(value, shared[key], rtol=0, atol=0, msg=key)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "entities" / "model.safetensors"), "pt") as saved:
        assert not [key for key in saved.keys() if "pooler" in key]  # its class has none: it loads cleanly


# ---------------------------------------------------------------- a multi-task run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """task -> training file (48 rows) and "task:test" -> test file (8 rows)."""
    from llmkit.corpora import peoples_daily

    folder = tmp_path_factory.mktemp("data")
    texts = [row["text"] for row in peoples_daily() if len(row["text"]) >= 24][:56]
    files = {}
    for task in TASKS.values():
        files[task] = write_jsonl(folder / f"{task}.jsonl", task_rows(task, texts[:48]))
        files[f"{task}:test"] = write_jsonl(folder / f"{task}-test.jsonl", task_rows(task, texts[48:]))
    return files


def recipe_text(data: dict, output_dir: Path, name: str = "mt", steps: int = 24, more: str = "") -> str:
    tables = "".join(f'\n[[finetune.tasks]]\nname = "{name_}"\ntask = "{task}"\nsource = {json.dumps(data[task])}\n'
                     f"test_source = {json.dumps(data[task + ':test'])}\n" for name_, task in TASKS.items())
    return (f'[run]\nname = "{name}"\noutput_dir = {json.dumps(str(output_dir))}\n'
            f"[finetune]\nmax_length = 48\n{more}\n{tables}\n"
            "[tokenizer]\nkind = \"char\"\nvocab_size = 2000\nmin_frequency = 1\n"
            "[model]\narch = \"bert\"\nn_layer = 1\nn_head = 2\nd_model = 32\nd_ff = 64\nmax_positions = 64\n"
            f"[train]\nmax_steps = {steps}\nbatch_size = 8\neval_every = 12\nlog_every = 1\neval_batch_size = 16\n"
            "learning_rate = 3e-3\nwarmup_steps = 0\nprecision = \"fp32\"\n")


class TaskLosses(transformers.TrainerCallback):
    """Each task's loss on its training rows when training begins and ends, and the shared encoder's weights."""

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        dataset = train_dataloader.dataset
        batches = TaskBatches(dataset.lengths, 16, shuffle=False)
        self.batches = [train_dataloader.collate_fn([dataset[i] for i in batch]) for batch in batches]
        self.begin = self.look(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end = self.look(model)

    def look(self, model) -> dict:
        model.eval()
        losses = Counter()
        with torch.no_grad():
            for batch in self.batches:
                losses[batch["task"]] += model(**batch).loss.item()
        model.train()
        return {"losses": losses, "encoder": {k: v.clone() for k, v in model.encoder.state_dict().items()}}


def test_a_multitask_run_trains_every_task_and_saves_each_model_to_score_as_it_was_scored(
        recipe_file, data, tmp_path):
    watch = TaskLosses()
    result = finetune.run(load_recipe(recipe_file(recipe_text(data, tmp_path / "runs"))), callbacks=[watch])
    for task in TASKS:
        assert watch.end["losses"][task] < watch.begin["losses"][task], task
    assert any(not torch.equal(watch.begin["encoder"][k], watch.end["encoder"][k]) for k in watch.end["encoder"])

    assert set(result.validation_metrics) == {*TASKS, "mean_score"}
    assert result.validation_metrics["mean_score"] == pytest.approx(
        (result.validation_metrics["sentiment"]["accuracy"] + result.validation_metrics["entities"]["f1"]
         + result.validation_metrics["qa"]["f1"]) / 3)
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    assert final["test"] == result.test_metrics and set(final["test"]) == set(TASKS)
    assert (result.run_dir / "loss.png").is_file()

    encoders = []
    for name, task in TASKS.items():
        folder = result.run_dir / name
        model, tokenizer = load_model(str(folder), head=TASK_TABLE[task].head, dtype="float32")
        assert type(model).__name__ == CLASSES[task]
        assert (folder / "README.md").read_text().count("Multi-task") == 1
        encoders.append(model.base_model.state_dict())
        recipe = load_recipe(result.run_dir / "recipe.toml")
        settings = recipe.finetune.for_task(recipe.finetune.tasks[list(TASKS).index(name)])
        rows = load_task_data(settings, recipe.run.seed).test
        rescored = score(model, tokenizer, eval_task(settings, settings.test_source), rows, 16)
        headline = TASK_TABLE[task].headline[0]
        assert rescored[headline] == pytest.approx(result.test_metrics[name][headline], abs=1e-9), name
    for key, value in encoders[1].items():  # the tagger and the QA model read the classifier's encoder
        torch.testing.assert_close(value, encoders[0][key], rtol=0, atol=0)
        torch.testing.assert_close(encoders[2][key], value, rtol=0, atol=0)


def test_the_cli_prints_a_table_per_task_on_stdout_and_only_progress_on_stderr(recipe_file, data, tmp_path):
    recipe = recipe_file(recipe_text(data, tmp_path / "runs", steps=2))
    result = runner.invoke(app, ["finetune", str(recipe), "--set", "train.eval_every=2"])
    assert result.exit_code == 0, result.output
    assert problems(result.stderr) == []
    assert "3 tasks, one shared encoder" in result.stdout and "mean score" in result.stdout
    assert "models saved in" in result.stdout and "sentiment/, entities/, qa/" in result.stdout


@pytest.mark.slow
def test_resume_after_an_interrupt_ends_as_an_uninterrupted_run(recipe_file, data, tmp_path, monkeypatch):
    # 48 rows per task, 8 per batch: 18 batches an epoch. Stopped at step 7 of 24, the run resumes within
    # the first epoch and crosses into the second: the losses match only if the task batches come back.
    def run(name: str, **options):
        return finetune.run(load_recipe(recipe_file(recipe_text(data, tmp_path / "runs", name), f"{name}.toml")),
                            **options)

    whole = run("whole")
    with interrupted_at(monkeypatch, 7):
        run("parts")
    resumed = run("parts", resume=True)

    def logged(result) -> list[tuple]:
        return [(row["step"], key, row[key]) for row in read_jsonl(result.run_dir / "metrics.jsonl")
                for key in ("loss", "eval_loss", "eval_mean_score") if key in row]

    expected, got = logged(whole), logged(resumed)
    assert [row[:2] for row in got] == [row[:2] for row in expected]
    assert [row[2] for row in got] == pytest.approx([row[2] for row in expected], rel=0, abs=1e-6)
    from safetensors.torch import load_file

    for name in TASKS:
        a, b = (load_file(run.run_dir / name / "model.safetensors") for run in (whole, resumed))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("case, message", [
    ("one task", "finetune.tasks holds one task: use finetune.task"),
    ("lora", 'finetune.tasks (multi-task) trains the shared model and every head: method = "full", not "lora"'),
    ("same name", "finetune.tasks: two tasks are named 'sentiment'"),
    ("causal-lm", 'finetune.tasks[0].task "causal-lm" cannot share a model with other tasks'),
    ("loss metric", "finetune.tasks[0].metric: the checkpoint kept is the best by the mean of the tasks' scores"),
    ("no source", "finetune.tasks[1].source is empty"),
    ("teacher", "distill.teacher: multi-task fine-tuning (finetune.tasks) does not distill"),
])
def test_a_bad_multitask_recipe_exits_2_with_one_line_and_writes_nothing(recipe_file, data, tmp_path, case, message):
    first = f'task = "classification"\nsource = {json.dumps(data["classification"])}'
    second = f'task = "token-classification"\nsource = {json.dumps(data["token-classification"])}'
    tables = {"one task": [first], "lora": [first, second], "same name": [first, first],
              "causal-lm": [first.replace('"classification"', '"causal-lm"'), second],
              "loss metric": [first + '\nmetric = "loss"', second],
              "no source": [first, 'task = "extractive-qa"'], "teacher": [first, second]}[case]
    text = f'[run]\noutput_dir = {json.dumps(str(tmp_path / "runs"))}\n[finetune]\n'
    text += 'method = "lora"\n' if case == "lora" else ""
    text += "".join(f"[[finetune.tasks]]\n{table}\n" for table in tables)
    text += f'[distill]\nteacher = {json.dumps(str(tmp_path))}\n' if case == "teacher" else ""
    text = text.replace('task = "classification"', 'name = "sentiment"\ntask = "classification"') \
        if case == "same name" else text
    result = runner.invoke(app, ["finetune", str(recipe_file(text))])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()
