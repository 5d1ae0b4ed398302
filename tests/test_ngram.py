"""The character n-gram model with interpolated absolute discounting (llmkit/ngram.py): probabilities,
a hand-computed example, held-out loss per char; `model.arch = "ngram"` runs and the n-gram baseline of
every causal pretraining run (llmkit/pretrain.py)."""

import json
import math

import pytest

from llmkit import load_recipe, pretrain
from llmkit.errors import LlmkitError
from llmkit.ngram import END, UNKNOWN, NgramModel, estimate_discount
from llmkit.splits import count_chars

DOCS = ["今天天气很好。", "昨天天气很冷，今天很好。", "天气预报说明天下雨。", "ab", "今天好"]
HISTORIES = ["", "今", "今天", "今天天", "天气很", "很好。", "好。" + END, "xyz", "天x", [END], [END, "今"],
             ["。", END, "昨"]]


def approx_one(values) -> bool:
    return sum(values) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("discount", [None, 0.3, 1.0])
def test_probabilities_sum_to_one_over_the_vocabulary_for_every_history(order, discount):
    model = NgramModel.train(DOCS, order, discount)
    assert model.vocabulary[:2] == [UNKNOWN, END]
    for history in HISTORIES:
        distribution = model.distribution(history)
        assert set(distribution) == set(model.vocabulary)
        assert approx_one(distribution.values()), history
        assert all(p > 0 for p in distribution.values())


def test_a_hand_computed_bigram():
    # stream: a b </s> a </s>; vocabulary <unk> </s> a b (uniform 1/4); D = 0.5 at both orders.
    model = NgramModel.train(["ab", "a"], order=2, discount=0.5)
    # unigram: N = 5, three different symbols seen: (max(n - D, 0) + D x 3 x 1/4) / 5
    assert model.probability("a") == pytest.approx(0.375)
    assert model.probability("b") == pytest.approx(0.175)
    assert model.probability(END) == pytest.approx(0.375)
    assert model.probability("z") == model.probability(UNKNOWN) == pytest.approx(0.075)
    # after "a" (n = 2, followed by b and </s>): (max(n(a c) - D, 0) + D x 2 x P(c)) / 2
    assert model.probability("b", "a") == pytest.approx(0.25 + 0.5 * 0.175)
    assert model.probability(END, "a") == pytest.approx(0.25 + 0.5 * 0.375)
    assert model.probability("a", "a") == pytest.approx(0.5 * 0.375)
    # after </s>: seen twice as a symbol, but the last one ends the stream, so n(</s>) = 1, followed by a
    assert model.probability("a", [END]) == pytest.approx(0.5 + 0.5 * 0.375)
    # an unseen history falls back to the shorter one
    assert model.probability("a", "z") == model.probability("a", "b" + "z") == model.probability("a")
    # held out: "a" then </s>, over count_chars(["a"]) = 2
    scored = model.score(["a"])
    assert scored["chars"] == 2
    assert scored["loss_per_char"] == pytest.approx(-(math.log(0.375) + math.log(0.25 + 0.5 * 0.375)) / 2)


def test_order_one_is_the_absolutely_discounted_unigram_with_a_uniform_floor():
    model = NgramModel.train(DOCS, order=1)
    counts = {END: len(DOCS)}
    for doc in DOCS:
        for char in doc:
            counts[char] = counts.get(char, 0) + 1
    n, seen, size = sum(counts.values()), len(counts), len(counts) + 1  # + <unk>
    d = model.discounts[0]
    assert d == pytest.approx(estimate_discount(counts))
    for symbol in [*counts, UNKNOWN]:
        expected = (max(counts.get(symbol, 0) - d, 0) + d * seen / size) / n
        assert model.probability(symbol) == pytest.approx(expected)
        assert model.probability(symbol, "今天天气") == model.probability(symbol)  # no history at order 1


def test_the_discount_estimate_is_n1_over_n1_plus_twice_n2():
    assert estimate_discount({"a": 1, "b": 1, "c": 2, "d": 5}) == pytest.approx(2 / (2 + 2 * 1))
    assert estimate_discount({"a": 3}) == 0.5  # nothing seen once
    with pytest.raises(LlmkitError, match="discount"):
        NgramModel.train(DOCS, 2, discount=1.5)


def test_held_out_loss_is_finite_per_character_with_unseen_characters():
    model = NgramModel.train(DOCS, order=3)
    held_out = ["今天下雪了！", "qq"]
    scored = model.score(held_out)
    assert scored["chars"] == count_chars(held_out) == 10
    assert scored["unknown"] == 5  # 雪 了 ！ q q
    assert math.isfinite(scored["loss_per_char"]) and scored["loss_per_char"] > 0
    direct = -sum(math.log(model.probability(symbol, history)) for symbol, history in [
        ("今", ""), ("天", "今"), ("下", "今天"), ("雪", "天下"), ("了", "下雪"), ("！", "雪了"), (END, "了！"),
        ("q", ["！", END]), ("q", [END, "q"]), (END, "qq")])
    assert scored["nll"] == pytest.approx(direct)


def test_a_longer_history_helps_on_held_out_text():
    from llmkit.corpora import peoples_daily

    documents = [row["text"] for row in peoples_daily()[:1500]]
    train, held_out = documents[:1350], documents[1350:]
    losses = [NgramModel.train(train, order).score(held_out)["loss_per_char"] for order in (1, 2, 3)]
    assert losses[0] > losses[1] > losses[2]


def test_saved_model_loads_with_the_same_probabilities(tmp_path):
    model = NgramModel.train(DOCS, order=3)
    model.save(tmp_path / "ngram.json.gz")
    loaded = NgramModel.load(tmp_path)
    assert loaded.discounts == model.discounts and loaded.vocabulary == model.vocabulary
    for history in HISTORIES:
        assert loaded.distribution(history) == model.distribution(history)
    (tmp_path / "other.json.gz").write_bytes(b"not gzip")
    with pytest.raises(LlmkitError, match="not a readable n-gram model"):
        NgramModel.load(tmp_path / "other.json.gz")


def test_samples_continue_the_prompt_and_repeat_with_the_seed():
    model = NgramModel.train(DOCS, order=3)
    first = model.sample("今天", 10, seed=1)
    assert first.startswith("今天") and first == model.sample("今天", 10, seed=1)
    assert UNKNOWN not in first and END not in first


# ---------------------------------------------------------------- llmkit pretrain


@pytest.mark.slow
def test_ngram_arch_writes_a_run_folder_with_its_loss_per_char(tiny, tmp_path, capsys):
    result = pretrain.run(load_recipe("pretrain-zh-tiny", [*tiny, "model.arch=ngram", "model.ngram_order=3"]))
    run_dir = tmp_path / "runs" / "tiny"
    for name in ("ngram.json.gz", "recipe.toml", "provenance.json", "final_metrics.json", "README.md"):
        assert (run_dir / name).is_file(), name
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["order"] == 3 and math.isfinite(final["eval_loss_per_char"]) and final["eval_loss_per_char"] > 0
    assert result.metrics["eval_loss_per_char"] == final["eval_loss_per_char"]
    assert "3-gram" in (run_dir / "README.md").read_text()
    assert NgramModel.load(run_dir).order == 3
    assert not (tmp_path / "runs" / "latest").exists()  # `llmkit generate` runs Transformers only
    out = capsys.readouterr().out
    assert f"{final['eval_loss_per_char']:.4f} nats/char" in out and result.samples[0].startswith("昨天天气很")


@pytest.mark.slow
def test_ngram_arch_refuses_a_model_path_and_resume(tiny, tmp_path):
    with pytest.raises(LlmkitError, match="ngram"):
        pretrain.run(load_recipe("pretrain-zh-tiny", [*tiny, "model.arch=ngram", f"model.path={tmp_path}"]))
    with pytest.raises(LlmkitError, match="ngram"):
        pretrain.run(load_recipe("pretrain-zh-tiny", [*tiny, "model.arch=ngram"]), resume=True)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_causal_pretraining_reports_the_ngram_baseline(tiny, tmp_path, capsys):
    from llmkit.data import load_text_splits, texts

    recipe = load_recipe("pretrain-zh-tiny", [*tiny, "model.ngram_order=3"])
    result = pretrain.run(recipe)
    final = json.loads((tmp_path / "runs" / "tiny" / "final_metrics.json").read_text())
    splits = load_text_splits(recipe.data)
    expected = NgramModel.train(list(texts(splits.train)), 3).score(list(texts(splits.validation)))["loss_per_char"]
    assert final["baseline_ngram_loss_per_char"] == pytest.approx(expected)
    assert final["baseline_ngram_order"] == 3
    assert result.metrics["baseline_ngram_loss_per_char"] == final["baseline_ngram_loss_per_char"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("baseline:")]
    assert lines == [f"baseline: a 3-gram (absolute discounting) scores {expected:.4f} nats/char on this "
                     f"validation split; this model {final['eval_loss_per_char']:.4f}"]
    assert "3-gram" in (tmp_path / "runs" / "tiny" / "README.md").read_text()
