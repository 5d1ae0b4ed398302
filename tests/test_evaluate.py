"""llmkit eval on tiny random models: each scorer against a direct computation, errors, the CLI. Covers
llmkit/evaluate.py and the scorers of the task modules (llmkit/task_kinds/perplexity.py, llmkit/task_kinds/generation.py,
and the score() of llmkit/task_kinds/classification.py, llmkit/task_kinds/token_classification.py and
llmkit/task_kinds/extractive_qa.py, with their shared forward pass, llmkit/task_kinds/common.py)."""

import json
import math

import pytest
import tomli_w
import torch
from typer.testing import CliRunner

from llmkit import load_recipe
from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.evaluate import run
from llmkit.metrics import classification_metrics
from llmkit.loading import load_model
from tests.conftest import char_tokenizer, save_tiny_model

runner = CliRunner()
TEXTS = ["今天天气很好", "我们热爱和平", "经济发展迅速", "人民生活改善", "北京是首都", "新年快乐"]


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("causal") / "model", "LlamaForCausalLM", char_tokenizer())


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def evaluate(tmp_path, model, *tasks, **eval_settings):
    """Metrics of the first task for `model`, through a recipe file with [[eval.tasks]] tables."""
    recipe = tmp_path / "eval-recipe.toml"
    recipe.write_text(tomli_w.dumps({"eval": {"output": str(tmp_path / "eval.json"), **eval_settings,
                                              "tasks": list(tasks)}}), encoding="utf-8")
    return run(load_recipe(recipe), models=[str(model)])[0].metrics


def test_perplexity_equals_a_direct_computation_with_plain_transformers(causal_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "text.txt"
    data.write_text("\n".join(TEXTS * 5), encoding="utf-8")
    metrics = evaluate(tmp_path, causal_dir, {"kind": "perplexity", "source": str(data), "context_length": 16,
                                              "stride": 8})
    model = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    stream = [t for text in TEXTS * 5 for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(stream) - 1, 8):  # the sliding-window recipe of the transformers docs
        end = min(begin + 16, len(stream))
        new = end - max(previous_end, begin + 1)
        ids = torch.tensor([stream[begin:end]])
        labels = ids.clone()
        labels[:, : ids.shape[1] - new] = -100
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item() * new
        count, previous_end = count + new, end
        if end == len(stream):
            break
    assert count == len(stream) - 1 == metrics["tokens"]
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert metrics["loss_per_char"] == pytest.approx(total / sum(len(t) + 1 for t in TEXTS * 5), rel=1e-4)


def test_builtin_corpus_is_scored_on_its_held_out_tail(causal_dir, tmp_path):
    metrics = evaluate(tmp_path, causal_dir, {"kind": "perplexity", "source": "peoples-daily"}, limit=3)
    assert metrics["chars"] == sum(len(doc) + 1 for doc in held_out_documents()[:3])


def held_out_documents():
    from llmkit.corpora import peoples_daily
    from llmkit.splits import split_documents

    return split_documents([row["text"] for row in peoples_daily()], 0.1)[1]


def test_classification_matches_argmax_of_the_model(tmp_path):
    model_dir = save_tiny_model(tmp_path / "clf", "BertForSequenceClassification", char_tokenizer("mlm"),
                                id2label={0: "负面", 1: "正面"}, label2id={"负面": 0, "正面": 1})
    rows = [{"text": text, "label": "正面" if i % 2 else 0} for i, text in enumerate(TEXTS)]
    data = write_jsonl(tmp_path / "reviews.jsonl", rows)
    metrics = evaluate(tmp_path, model_dir, {"kind": "classification", "source": str(data)})
    model, tokenizer = load_model(str(model_dir), head="sequence-classification")
    with torch.no_grad():
        predicted = [model(**tokenizer(text, return_tensors="pt")).logits.argmax(-1).item() for text in TEXTS]
    expected = classification_metrics([["负面", "正面"][p] for p in predicted],
                                      ["正面" if i % 2 else "负面" for i in range(len(TEXTS))], ["负面", "正面"])
    assert metrics["accuracy"] == expected["accuracy"] and metrics["confusion_matrix"] == expected["confusion_matrix"]


def char_rule_bert(path, model_class: str, rule: dict[str, int], default: int, **config):
    """A tiny BERT whose head output for a token depends only on its character: output i is 32 for the
    characters `rule` maps to i (others: `default`) and 0 otherwise, so a scorer's predictions are known
    exactly. How: position and segment embeddings and the attention and feed-forward branches are zeroed,
    so each hidden state is the layer-normed character embedding; embeddings and head rows are orthogonal
    +-1 vectors (rows of a Hadamard matrix)."""
    import transformers

    tokenizer = char_tokenizer("mlm")
    save_tiny_model(path, model_class, tokenizer, **config)
    model = getattr(transformers, model_class).from_pretrained(path)
    hadamard = torch.ones(1, 1)
    while len(hadamard) < model.config.hidden_size:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    walsh = hadamard[1:]  # zero mean, unit variance: layer norm leaves them as they are
    with torch.no_grad():
        embeddings = model.bert.embeddings
        embeddings.position_embeddings.weight.zero_()
        embeddings.token_type_embeddings.weight.zero_()
        embeddings.word_embeddings.weight.copy_(walsh[default])
        for char, output in rule.items():
            assert tokenizer.convert_tokens_to_ids(char) != tokenizer.unk_token_id, char
            embeddings.word_embeddings.weight[tokenizer.convert_tokens_to_ids(char)] = walsh[output]
        for layer in model.bert.encoder.layer:
            for branch in (layer.attention.output.dense, layer.output.dense):
                branch.weight.zero_()
                branch.bias.zero_()
        head = model.get_submodule("qa_outputs" if hasattr(model, "qa_outputs") else "classifier")
        head.weight.copy_(walsh[: head.out_features])
        head.bias.zero_()
    model.save_pretrained(path)
    return path


def test_token_classification_scores_the_entities_of_the_predicted_tags(tmp_path):
    labels = ["O", "B-LOC", "I-LOC"]
    # Predicts B-LOC for 北, I-LOC for 京, O for every other character.
    model_dir = char_rule_bert(tmp_path / "ner", "BertForTokenClassification", {"北": 1, "京": 2}, default=0,
                               id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    rows = [{"tokens": list("北京是首都"), "tags": ["B-LOC", "I-LOC", "O", "O", "O"]},  # predicted right
            {"tokens": list("首都北京"), "tags": ["B-LOC", "I-LOC", "O", "O"]},  # predicted at the wrong place
            {"tokens": list("京城"), "tags": ["O", "O"]}]  # a lone I-LOC: one predicted entity (lenient)
    metrics = evaluate(tmp_path, model_dir, {"kind": "token-classification",
                                             "source": str(write_jsonl(tmp_path / "ner.jsonl", rows))})
    counts = [metrics[f"{k}_entities"] for k in ("predicted", "reference", "correct")]
    assert counts == [3, 2, 1]
    assert (metrics["precision"], metrics["recall"]) == (pytest.approx(1 / 3), pytest.approx(1 / 2))
    assert metrics["f1"] == pytest.approx(0.4)


def test_extractive_qa_picks_the_best_span_inside_the_context(tmp_path):
    # Start logit 32 on 北, end logit 32 on 京, 0 elsewhere: the answer is always the first 北京 of the context.
    model_dir = char_rule_bert(tmp_path / "qa", "BertForQuestionAnswering", {"北": 0, "京": 1}, default=2)
    rows = [{"context": "北京是中国的首都。", "question": "首都是哪里？", "answers": {"text": ["北京"]}},
            # 北京 in the question scores as high, but answers are spans of the context: "北京", not "在北京"
            {"context": "首都在北京。", "question": "北京在哪里？", "answers": {"text": ["在北京"]}}]
    metrics = evaluate(tmp_path, model_dir, {"kind": "extractive-qa", "source": str(write_jsonl(tmp_path / "qa.jsonl", rows))})
    # Second answer: 2 of 2 predicted characters right, 2 of 3 reference characters found: F1 0.8.
    scores = {key: metrics[key] for key in ("exact_match", "f1", "count")}
    assert scores == {"exact_match": 0.5, "f1": pytest.approx((1 + 0.8) / 2), "count": 2}


def test_generation_scores_greedy_continuations(causal_dir, tmp_path):
    from llmkit.generation import generate_batch
    from llmkit.metrics import generation_metrics
    from llmkit.settings import GenerateSettings

    rows = [{"prompt": "今天", "reference": "天气很好"}, {"prompt": "我们", "reference": "热爱和平"}]
    metrics = evaluate(tmp_path, causal_dir, {"kind": "generation", "source": str(write_jsonl(tmp_path / "g.jsonl", rows)),
                                              "max_new_tokens": 4})
    model, tokenizer = load_model(str(causal_dir))
    outputs = generate_batch(model, tokenizer, ["今天", "我们"],
                             GenerateSettings(greedy=True, max_new_tokens=4, repetition_penalty=1.0))
    assert metrics["chrf"] == pytest.approx(generation_metrics([o[0] for o in outputs], ["天气很好", "热爱和平"])["chrf"])


def test_a_task_that_does_not_fit_the_head_is_refused(causal_dir, tmp_path):
    data = write_jsonl(tmp_path / "reviews.jsonl", [{"text": "好", "label": 1}])
    with pytest.raises(LlmkitError, match="is a LlamaForCausalLM: it has no sequence-classification head"):
        evaluate(tmp_path, causal_dir, {"kind": "classification", "source": str(data)})


def test_missing_column_is_named_before_any_model_loads(tmp_path):
    data = write_jsonl(tmp_path / "reviews.jsonl", [{"text": "好"}])
    with pytest.raises(LlmkitError, match=r"reviews\.jsonl:1: expected a 'label' field"):
        evaluate(tmp_path, tmp_path / "no-model-here", {"kind": "classification", "source": str(data)})


def test_cli_compares_models_writes_json_and_records_in_runs(causal_dir, tmp_path):
    import shutil

    from llmkit.rundir import OWNER_MARK

    run_dir = tmp_path / "runs" / "a-run"
    shutil.copytree(causal_dir, run_dir)
    (run_dir / OWNER_MARK).write_text("{}")  # a run llmkit made: it keeps its evaluations
    (run_dir / "metrics.jsonl").write_text("")
    data = tmp_path / "text.txt"
    data.write_text("\n".join(TEXTS), encoding="utf-8")
    recipe = tmp_path / "eval.toml"
    recipe.write_text(f'[eval]\noutput = "{tmp_path / "out.json"}"\n[[eval.tasks]]\nkind = "perplexity"\n'
                      f'source = "{data}"\nname = "mine"\n', encoding="utf-8")
    result = runner.invoke(app, ["eval", str(recipe), "--model", str(causal_dir), "--model", str(run_dir)])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [r["model"] for r in results] == [str(causal_dir), str(run_dir)]
    assert results[0]["metrics"]["perplexity"] == pytest.approx(results[1]["metrics"]["perplexity"])
    assert json.loads((run_dir / "evaluations.jsonl").read_text())["eval_task"] == "mine"
    assert (run_dir / "metrics.jsonl").read_text() == ""  # training metrics untouched: --resume reads them
    assert not (causal_dir / "evaluations.jsonl").exists()  # a model folder llmkit did not make is only read
    assert "loss_per_char" in result.stdout


def test_cli_bad_limit_exits_2(tmp_path):
    result = runner.invoke(app, ["eval", "eval-ppl", "--limit", "0"])
    assert result.exit_code == 2 and "--limit must be at least 1" in result.stderr
