"""Scores for `llmkit eval` and `llmkit finetune`: classification, NER, extractive QA and generation.

Pure functions over plain lists, returning plain Python floats, ints, strings and lists, so that a result can go
straight into metrics.jsonl. Rates are fractions in [0, 1], except BLEU and chrF, which keep sacrebleu's 0-100
scale so that they read like the figures in papers. Chinese is a first-class input: QA and ROUGE-L treat each CJK
character as a token (English words stay whole), and BLEU switches to sacrebleu's "zh" tokenizer by itself.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Hashable, Sequence

from llmkit.errors import LlmkitError

# CJK ideographs (unified, extensions A-F, compatibility) and kana/hangul: scripts written without spaces, where
# one character is the natural unit of comparison.
_CJK_RANGES = (
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7AF),  # hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x2FA1F),  # CJK extensions B-F and compatibility supplement
)
_CJK_CLASS = "".join(f"\\U{low:08X}-\\U{high:08X}" for low, high in _CJK_RANGES)
_CJK = re.compile(f"[{_CJK_CLASS}]")
# A token is one CJK character or a run of other non-space characters.
_TOKEN = re.compile(f"[{_CJK_CLASS}]|[^\\s{_CJK_CLASS}]+")
# For ROUGE-L: the same, but runs are of word characters only, so punctuation is not a token.
_WORD_TOKEN = re.compile(f"[{_CJK_CLASS}]|[^\\W{_CJK_CLASS}]+")
_ARTICLES = frozenset({"a", "an", "the"})


# --------------------------------------------------------------------------------------------------- shared helpers

def _check_lengths(predictions: Sequence, references: Sequence) -> int:
    """Pairs are matched by position, so a length mismatch means misaligned data: refuse rather than truncate."""
    if len(predictions) != len(references):
        raise LlmkitError(f"cannot score {len(predictions)} predictions but {len(references)} references; "
                          "expected one reference per prediction")
    if not predictions:
        raise LlmkitError("cannot score 0 predictions; expected at least one prediction and reference")
    return len(predictions)


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, 0.0 when nothing was counted (as scikit-learn and seqeval report it)."""
    return float(numerator) / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _reference_list(reference, index: int) -> list[str]:
    """One reference string, or several acceptable ones, as a non-empty list of strings."""
    answers = [reference] if isinstance(reference, str) else reference
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
        raise LlmkitError(f"reference {index}: {reference!r} cannot be scored; expected a string or a non-empty "
                          "list of strings")
    return list(answers)


def _check_prediction(prediction, index: int) -> str:
    if not isinstance(prediction, str):
        raise LlmkitError(f"prediction {index}: {prediction!r} cannot be scored; expected a string")
    return prediction


def has_cjk(text: str) -> bool:
    """Whether text contains a CJK character (Chinese, Japanese kana, Korean hangul)."""
    return _CJK.search(text) is not None


def _is_punctuation(char: str) -> bool:
    """ASCII punctuation, Unicode punctuation (，。、《》「」…) and full-width forms of ASCII symbols (＋～＄)."""
    if char in string.punctuation or unicodedata.category(char).startswith("P"):
        return True
    return 0xFF01 <= ord(char) <= 0xFF5E and unicodedata.normalize("NFKC", char) in string.punctuation


# --------------------------------------------------------------------------------------------------- classification

def _sorted_labels(values: set) -> list:
    try:
        return sorted(values)
    except TypeError:
        kinds = sorted({type(value).__name__ for value in values})
        raise LlmkitError(f"labels mix types ({', '.join(kinds)}); expected all ints or all strings, e.g. "
                          "map predicted strings back to label ids first") from None


def classification_metrics(predictions: Sequence[Hashable], references: Sequence[Hashable],
                           labels: Sequence[Hashable] | None = None) -> dict:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix.

    `labels` fixes the class order (and includes classes that never occur, which then count in the macro means
    with 0.0, as scikit-learn does); by default it is the sorted union of predictions and references. A value
    outside `labels` is refused rather than dropped, so that a generative model answering "maybe" cannot
    silently improve the scores: map such answers to a label first.

    Returns accuracy, precision, recall, f1 (macro, fractions in [0, 1]), labels, per_class (keyed by
    str(label): precision, recall, f1, support), confusion_matrix (rows = reference, columns = prediction, in
    `labels` order) and count.
    """
    count = _check_lengths(predictions, references)
    if labels is None:
        labels = _sorted_labels(set(predictions) | set(references))
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise LlmkitError(f"labels {labels!r} repeat a label; expected each label once")
    position = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for i, (predicted, reference) in enumerate(zip(predictions, references)):
        for role, value in (("prediction", predicted), ("reference", reference)):
            if value not in position:
                raise LlmkitError(f"{role} {i}: label {value!r} is not one of the labels {labels!r}")
        matrix[position[reference]][position[predicted]] += 1

    per_class = {}
    for k, label in enumerate(labels):
        true_positives = matrix[k][k]
        support = sum(matrix[k])
        predicted = sum(row[k] for row in matrix)
        precision, recall = _ratio(true_positives, predicted), _ratio(true_positives, support)
        per_class[str(label)] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
                                 "support": support}
    scores = list(per_class.values())
    return {
        "accuracy": _ratio(sum(matrix[k][k] for k in range(len(labels))), count),
        "precision": sum(s["precision"] for s in scores) / len(scores),
        "recall": sum(s["recall"] for s in scores) / len(scores),
        "f1": sum(s["f1"] for s in scores) / len(scores),
        "labels": labels,
        "per_class": per_class,
        "confusion_matrix": matrix,
        "count": count,
    }


# --------------------------------------------------------------------------------------------------------- entities

def _parse_tag(tag, index: int) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''). The type may itself contain '-' ('B-LOC-CITY')."""
    if tag == "O":
        return "O", ""
    if isinstance(tag, str) and tag[:2] in ("B-", "I-") and len(tag) > 2:
        return tag[0], tag[2:]
    raise LlmkitError(f"tag {index}: {tag!r} is not a BIO tag; expected 'O', 'B-TYPE' or 'I-TYPE'")


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities in one sentence's BIO tags, as (type, start, end) with `end` exclusive (tokens[start:end]).

    Lenient like seqeval's default mode, because models do emit ill-formed sequences and the usual scores
    count them this way: an I- tag after O (or at the start) begins an entity, and an I- tag of another type
    ends the current entity and begins a new one.
    """
    spans: set[tuple[str, int, int]] = set()
    kind, start = "", -1
    for i, tag in enumerate(tags):
        prefix, tag_kind = _parse_tag(tag, i)
        if kind and (prefix != "I" or tag_kind != kind):
            spans.add((kind, start, i))
            kind = ""
        if prefix != "O" and not kind:
            kind, start = tag_kind, i
    if kind:
        spans.add((kind, start, len(tags)))
    return spans


def entity_metrics(predicted_tag_sequences: Sequence[Sequence[str]],
                   reference_tag_sequences: Sequence[Sequence[str]]) -> dict:
    """Entity-level scores, as seqeval reports them: an entity counts only if its type and both ends are right.

    Returns precision, recall, f1 (micro over all entities, fractions in [0, 1]), per_type (type -> precision,
    recall, f1, support = reference entities of that type, for every type predicted or referenced), and the
    counts predicted_entities, reference_entities and correct_entities.
    """
    _check_lengths(predicted_tag_sequences, reference_tag_sequences)
    predicted: set[tuple[int, str, int, int]] = set()
    reference: set[tuple[int, str, int, int]] = set()
    for n, (tags, gold) in enumerate(zip(predicted_tag_sequences, reference_tag_sequences)):
        if len(tags) != len(gold):
            raise LlmkitError(f"sentence {n}: {len(tags)} predicted tags but {len(gold)} reference tags; "
                              "expected one tag per token in both")
        predicted |= {(n, *span) for span in entity_spans(tags)}
        reference |= {(n, *span) for span in entity_spans(gold)}
    correct = predicted & reference

    per_type = {}
    for kind in sorted({entity[1] for entity in predicted | reference}):
        n_correct = sum(1 for entity in correct if entity[1] == kind)
        n_predicted = sum(1 for entity in predicted if entity[1] == kind)
        n_reference = sum(1 for entity in reference if entity[1] == kind)
        precision, recall = _ratio(n_correct, n_predicted), _ratio(n_correct, n_reference)
        per_type[kind] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
                          "support": n_reference}
    precision, recall = _ratio(len(correct), len(predicted)), _ratio(len(correct), len(reference))
    return {
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "per_type": per_type,
        "predicted_entities": len(predicted),
        "reference_entities": len(reference),
        "correct_entities": len(correct),
    }


# ---------------------------------------------------------------------------------------------- extractive QA

def answer_tokens(text: str) -> list[str]:
    """SQuAD normalisation, extended to Chinese: the tokens that exact match and F1 compare.

    Lower-cased; punctuation removed (ASCII and CJK, without leaving a space, as SQuAD does: "don't" -> "dont");
    each CJK character is a token and other runs of characters stay whole words; the English articles a/an/the
    are dropped. Whitespace is not significant, so "北京 大学" and "北京大学" are the same answer.
    """
    text = "".join(char for char in text.lower() if not _is_punctuation(char))
    return [token for token in _TOKEN.findall(text) if token not in _ARTICLES]


def _answer_f1(predicted: list[str], reference: list[str]) -> float:
    """Bag-of-tokens F1 (SQuAD v1.1); two empty answers agree (1.0) as in SQuAD v2.0, rather than scoring 0."""
    if not predicted or not reference:
        return float(predicted == reference)
    overlap = sum((Counter(predicted) & Counter(reference)).values())
    return _f1(overlap / len(predicted), overlap / len(reference))


def squad_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """Exact match and token F1 of extractive answers, as the SQuAD v1.1 script computes them.

    Each reference is one answer or a list of acceptable answers; each prediction scores its best match.
    Text is normalised by `answer_tokens`, so Chinese answers are compared character by character.
    Returns exact_match and f1 as fractions in [0, 1] (the SQuAD script prints them x100), and count.
    """
    count = _check_lengths(predictions, references)
    exact = f1 = 0.0
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        tokens = answer_tokens(_check_prediction(prediction, i))
        golds = [answer_tokens(answer) for answer in _reference_list(reference, i)]
        exact += max(float(tokens == gold) for gold in golds)
        f1 += max(_answer_f1(tokens, gold) for gold in golds)
    return {"exact_match": exact / count, "f1": f1 / count, "count": count}


# ------------------------------------------------------------------------------------------------------ generation

def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair: LCS over CJK characters and lower-cased words, punctuation ignored.

    Tokenising CJK by character matters: the rouge-score package drops non-ASCII text and scores Chinese as 0.
    """
    predicted = _WORD_TOKEN.findall(prediction.lower())
    gold = _WORD_TOKEN.findall(reference.lower())
    if not predicted or not gold:
        return float(predicted == gold)
    common = _lcs_length(predicted, gold)
    return _f1(common / len(predicted), common / len(gold))


def generation_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, 0-100 scale) and mean ROUGE-L F1 (fraction in [0, 1]).

    Each reference is one string or a list of strings (the number may vary between predictions). BLEU uses
    sacrebleu's "zh" tokenizer when any prediction or reference contains CJK characters, else the standard
    "13a", since 13a would treat a whole Chinese sentence as one word; bleu_tokenize says which was used.
    ROUGE-L takes the best reference for each prediction and averages over predictions.
    """
    from sacrebleu.metrics import BLEU, CHRF

    count = _check_lengths(predictions, references)
    hypotheses = [_check_prediction(prediction, i) for i, prediction in enumerate(predictions)]
    reference_lists = [_reference_list(reference, i) for i, reference in enumerate(references)]
    tokenize = "zh" if any(has_cjk(text) for text in hypotheses + sum(reference_lists, [])) else "13a"
    # sacrebleu wants one stream per reference position; None pads predictions that have fewer references.
    width = max(len(answers) for answers in reference_lists)
    streams = [[answers[k] if k < len(answers) else None for answers in reference_lists] for k in range(width)]
    bleu = BLEU(tokenize=tokenize).corpus_score(hypotheses, streams)
    chrf = CHRF().corpus_score(hypotheses, streams)
    rouge = sum(max(rouge_l(hypothesis, answer) for answer in answers)
                for hypothesis, answers in zip(hypotheses, reference_lists))
    return {
        "bleu": float(bleu.score),
        "chrf": float(chrf.score),
        "rouge_l": rouge / count,
        "bleu_tokenize": tokenize,
        "count": count,
    }
