"""Scores for `llmkit eval` and `llmkit finetune`: classification, NER, extractive QA and generation.

Pure functions over plain lists, returning plain Python floats, ints, strings and lists, so that a result can go
straight into metrics.jsonl. Rates are fractions in [0, 1], except BLEU and chrF, which keep sacrebleu's 0-100
scale so that they read like the figures in papers.

The scores come from the libraries that papers use, so that llmkit's figures compare with published ones:
scikit-learn (accuracy, precision/recall/F1, confusion matrix), seqeval (entity scores, its default mode),
sacrebleu (BLEU, chrF) and rouge-score (ROUGE-L, given a tokenizer that splits CJK text into characters, since
its default one drops all non-ASCII text and would score Chinese as 0). Each is imported only when its score is
asked for.

Extractive QA is llmkit's own code, because no maintained library packages the official scripts (they are
single files, or metric scripts fetched from the Hugging Face Hub at run time): Chinese answers are scored exactly as the CMRC 2018 evaluation script
does (also used for DRCD and CLUE), English ones exactly as the SQuAD v1.1 script does. tests/test_metrics.py
checks both against transcriptions of those scripts.
"""

from __future__ import annotations

import functools
import re
import string
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from difflib import SequenceMatcher

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
# For ROUGE-L: one CJK character, or a run of letters and digits (no "_"), so that ASCII text splits exactly as
# rouge-score's default tokenizer splits it, while other scripts (é, ß, Cyrillic) are kept rather than dropped.
_ROUGE_TOKEN = re.compile(f"[{_CJK_CLASS}]|[^\\W_{_CJK_CLASS}]+")


# --------------------------------------------------------------------------------------------------- shared helpers

def _check_lengths(predictions: Sequence, references: Sequence) -> int:
    """Pairs are matched by position, so a length mismatch means misaligned data: refuse rather than truncate."""
    if len(predictions) != len(references):
        raise LlmkitError(f"cannot score {len(predictions)} predictions but {len(references)} references; "
                          "expected one reference per prediction")
    if not predictions:
        raise LlmkitError("cannot score 0 predictions; expected at least one prediction and reference")
    return len(predictions)


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
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix, from scikit-learn.

    `labels` fixes the class order (and includes classes that never occur, which then count in the macro means
    with 0.0, as scikit-learn does); by default it is the sorted union of predictions and references. A value
    outside `labels` is refused rather than dropped, so that a generative model answering "maybe" cannot
    silently improve the scores: map such answers to a label first. A rate whose denominator is 0 is 0.0
    (scikit-learn's zero_division=0).

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
    known = set(labels)
    for i, (predicted, reference) in enumerate(zip(predictions, references)):
        for role, value in (("prediction", predicted), ("reference", reference)):
            if value not in known:
                raise LlmkitError(f"{role} {i}: label {value!r} is not one of the labels {labels!r}")

    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = list(references), list(predictions)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None,
                                                                     zero_division=0)
    macro = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    with warnings.catch_warnings():  # it warns of a 1 x 1 matrix even when given labels, which fix its shape
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        matrix = confusion_matrix(y_true, y_pred, labels=labels)
    per_class = {str(label): {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                              "support": int(support[k])}
                 for k, label in enumerate(labels)}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(macro[0]),
        "recall": float(macro[1]),
        "f1": float(macro[2]),
        "labels": labels,
        "per_class": per_class,
        "confusion_matrix": [[int(n) for n in row] for row in matrix],
        "count": count,
    }


def bootstrap_intervals(references: Sequence[Hashable], predictions: dict[str, Sequence[Hashable]],
                        labels: Sequence[Hashable] | None = None, resamples: int = 2000, seed: int = 1234,
                        differences: Sequence[tuple[str, str]] = ()) -> dict:
    """95% bootstrap confidence intervals of the accuracy and macro F1 of methods scored on the same rows.

    A resample draws the rows with replacement, which is drawing the counts of the distinct rows (reference,
    predictions) from a multinomial: that is how it is done. Each method's intervals come from its own
    resamples (of the cells of its confusion matrix, seeded), so they do not depend on which other methods are
    scored beside it. A pair (a, b) of `differences` gets the interval of accuracy(a) - accuracy(b) from
    resamples of the rows shared by both (a paired bootstrap). The intervals are the 2.5th and 97.5th
    percentiles of the resampled scores, rounded to 4 places.

    Returns {method: {"accuracy_ci95": [low, high], "f1_ci95": [low, high]}}, and {"a - b": {"accuracy_ci95":
    [low, high]}} for each pair of `differences`.
    """
    import numpy as np

    count = _check_lengths(references, references)
    for predicted in predictions.values():
        _check_lengths(predicted, references)
    if labels is None:
        labels = _sorted_labels({*references, *(p for predicted in predictions.values() for p in predicted)})
    index = {label: k for k, label in enumerate(labels)}
    for role, values in (("reference", references), *((f"prediction of {name}", p) for name, p in predictions.items())):
        unknown = next((value for value in values if value not in index), None)
        if unknown is not None:
            raise LlmkitError(f"{role}: label {unknown!r} is not one of the labels {list(labels)!r}")
    codes = {name: np.array([index[value] for value in values])
             for name, values in (("", references), *predictions.items())}

    def resample(*names: str):
        """(the distinct rows of these columns (reference first), the counts of each in every resample)."""
        cells, counts = np.unique(np.stack([codes[""], *(codes[name] for name in names)], axis=1), axis=0,
                                  return_counts=True)  # sorted: by reference, then predictions
        return cells, np.random.default_rng(seed).multinomial(count, counts / count, size=resamples)

    def interval(values) -> list[float]:
        return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]

    result = {}
    for name in predictions:
        cells, draws = resample(name)
        reference, predicted = cells[:, 0], cells[:, 1]
        f1 = []
        for k in range(len(labels)):
            correct = draws @ ((predicted == k) & (reference == k))
            total = draws @ (predicted == k) + draws @ (reference == k)  # predicted + support: F1 = 2 tp / total
            f1.append(np.divide(2 * correct, total, out=np.zeros(resamples), where=total > 0))
        result[name] = {"accuracy_ci95": interval(draws @ (predicted == reference) / count),
                        "f1_ci95": interval(np.mean(f1, axis=0))}
    for a, b in differences:
        cells, draws = resample(a, b)
        gain = (cells[:, 1] == cells[:, 0]).astype(int) - (cells[:, 2] == cells[:, 0])
        result[f"{a} - {b}"] = {"accuracy_ci95": interval(draws @ gain / count)}
    return result


# --------------------------------------------------------------------------------------------------------- entities

def _check_tags(tags: Sequence[str]) -> list[str]:
    """BIO tags as a list: 'O', 'B-TYPE' or 'I-TYPE' (the type may itself contain '-', as in 'B-LOC-CITY').

    seqeval would only warn about anything else (and read E-/S- tags as IOBES), so llmkit refuses it first.
    """
    for i, tag in enumerate(tags):
        if tag != "O" and not (isinstance(tag, str) and tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise LlmkitError(f"tag {i}: {tag!r} is not a BIO tag; expected 'O', 'B-TYPE' or 'I-TYPE'")
    return list(tags)


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities in one sentence's BIO tags, as (type, start, end) with `end` exclusive (tokens[start:end]).

    seqeval's own reading (its default mode), lenient because models do emit ill-formed sequences and the usual
    scores count them this way: an I- tag after O (or at the start) begins an entity, and an I- tag of another
    type ends the current entity and begins a new one.
    """
    from seqeval.metrics.sequence_labeling import get_entities

    return {(kind, start, end + 1) for kind, start, end in get_entities(_check_tags(tags))}


def entity_metrics(predicted_tag_sequences: Sequence[Sequence[str]],
                   reference_tag_sequences: Sequence[Sequence[str]]) -> dict:
    """Entity-level scores from seqeval (default mode): an entity counts only if its type and both ends are right.

    Returns precision, recall, f1 (micro over all entities, fractions in [0, 1]), per_type (type -> precision,
    recall, f1, support = reference entities of that type, for every type predicted or referenced), and the
    counts predicted_entities, reference_entities and correct_entities. A rate whose denominator is 0 is 0.0.
    """
    _check_lengths(predicted_tag_sequences, reference_tag_sequences)
    y_pred, y_true = [], []
    for n, (tags, gold) in enumerate(zip(predicted_tag_sequences, reference_tag_sequences)):
        if len(tags) != len(gold):
            raise LlmkitError(f"sentence {n}: {len(tags)} predicted tags but {len(gold)} reference tags; "
                              "expected one tag per token in both")
        y_pred.append(_check_tags(tags))
        y_true.append(_check_tags(gold))

    from seqeval.metrics.sequence_labeling import get_entities, precision_recall_fscore_support

    # seqeval reads a list of sentences as one sequence with an "O" between sentences, so an entity never spans
    # two sentences and the same span in another sentence is another entity.
    predicted, reference = set(get_entities(y_pred)), set(get_entities(y_true))
    kinds = sorted({entity[0] for entity in predicted | reference})
    per_type = {}
    if kinds:
        precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, average=None,
                                                                         zero_division=0)
        per_type = {kind: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                           "support": int(support[k])}
                    for k, kind in enumerate(kinds)}
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "per_type": per_type,
        "predicted_entities": len(predicted),
        "reference_entities": len(reference),
        "correct_entities": len(predicted & reference),
    }


# ---------------------------------------------------------------------------------------------- extractive QA

# The CMRC 2018 script's punctuation, verbatim: ASCII - : _ * ^ / \ ~ ` + = and the full-width marks. ASCII . , ! ?
# ' " ( ) are not in it, so they stay (and become tokens of their own in F1); "……" is two characters, so it
# never matches one. The script only ever compares it against single characters.
_CMRC_PUNCTUATION = frozenset(['-', ':', '_', '*', '^', '/', '\\', '~', '`', '+', '=',
                               '，', '。', '：', '？', '！', '“', '”', '；', '’', '《', '》', '……', '·', '、',
                               '「', '」', '（', '）', '－', '～', '『', '』'])
_CMRC_CHINESE = re.compile("[\u4e00-\u9fa5]")  # the script's test for a Chinese character
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SQUAD_PUNCTUATION = frozenset(string.punctuation)


def _english_words(text: str) -> list[str]:
    """nltk.word_tokenize, as the CMRC script splits runs of non-Chinese text, without its sentence splitter.

    The sentence splitter needs the punkt data, which is downloaded separately; llmkit never downloads anything
    to score. Without it, a full stop is split off only at the end of the run, not where punkt would see a
    sentence end inside it ("end. next" stays "end.", "next"), which an answer span hardly ever contains.
    """
    from nltk.tokenize import word_tokenize

    return word_tokenize(text, preserve_line=True)


def _cmrc_tokens(text: str) -> list[str]:
    """CMRC 2018's mixed_segmentation(text, rm_punc=True): each Chinese character a token, other runs as words.

    Lower-cased and stripped; its punctuation dropped where it stands (so "a-b" is the one word "ab").
    """
    tokens, run = [], ""
    for char in text.lower().strip():
        if char in _CMRC_PUNCTUATION:
            continue
        if _CMRC_CHINESE.match(char):
            if run:
                tokens.extend(_english_words(run))
                run = ""
            tokens.append(char)
        else:
            run += char
    if run:
        tokens.extend(_english_words(run))
    return tokens


def _cmrc_text(text: str) -> str:
    """CMRC 2018's remove_punctuation, which its exact match compares: lower-cased, stripped, punctuation removed.

    Spaces inside the text stay, so "北京 大学" does not exactly match "北京大学" (its F1 is still 1.0).
    """
    return "".join(char for char in text.lower().strip() if char not in _CMRC_PUNCTUATION)


def _squad_normalize(text: str) -> str:
    """SQuAD v1.1's normalize_answer: lower-cased, ASCII punctuation removed, articles a/an/the removed, spaces
    collapsed."""
    text = "".join(char for char in text.lower() if char not in _SQUAD_PUNCTUATION)
    return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    """The tokens that QA F1 compares for `text` on its own: CMRC 2018's if it contains CJK, else SQuAD v1.1's.

    CMRC 2018: lower-cased, its punctuation removed, each Chinese character a token and other runs split into
    words as nltk does ("The iPhone 12，在北京" -> the, iphone, 12, 在, 北, 京). SQuAD v1.1: lower-cased, ASCII
    punctuation and the articles a/an/the removed, split at whitespace. (squad_metrics picks the way per
    question, from the prediction and all its reference answers together.)
    """
    return _cmrc_tokens(text) if has_cjk(text) else _squad_normalize(text).split()


def _cmrc_f1(prediction: str, answer: str) -> float:
    """CMRC 2018's F1: precision and recall of the longest common substring of tokens (contiguous, unlike a
    bag of tokens), so "北大" scores 0.4 against "北京大", not 0.8. 0.0 when nothing is shared, even when both
    are empty."""
    predicted, gold = _cmrc_tokens(prediction), _cmrc_tokens(answer)
    common = SequenceMatcher(None, gold, predicted, autojunk=False).find_longest_match().size
    if common == 0:
        return 0.0
    precision = 1.0 * common / len(predicted)
    recall = 1.0 * common / len(gold)
    return (2 * precision * recall) / (precision + recall)


def _squad_f1(prediction: str, answer: str) -> float:
    """SQuAD v1.1's F1: bag-of-tokens overlap; 0.0 when nothing is shared, even when both are empty."""
    predicted, gold = _squad_normalize(prediction).split(), _squad_normalize(answer).split()
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision = 1.0 * common / len(predicted)
    recall = 1.0 * common / len(gold)
    return (2 * precision * recall) / (precision + recall)


def squad_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """Exact match and F1 of extractive answers, as the official scripts compute them.

    Each reference is one answer or a list of acceptable answers; each prediction scores its best match.
    The way is chosen per question: when the prediction or any of its reference answers contains a CJK
    character (`has_cjk`), the CMRC 2018 script's (Chinese: each character a token, F1 from the longest common
    substring, exact match after removing its punctuation and lower-casing); otherwise the SQuAD v1.1 script's
    (lower-cased, punctuation and articles removed, F1 from the bag of whitespace tokens). In both, an answer
    with no tokens left scores F1 0.0, even against an empty reference (its exact match can still be 1.0).
    Returns exact_match and f1 as fractions in [0, 1] (the scripts print them x100), and count.
    """
    count = _check_lengths(predictions, references)
    exact = f1 = 0.0
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        prediction = _check_prediction(prediction, i)
        answers = _reference_list(reference, i)
        if has_cjk(prediction) or any(has_cjk(answer) for answer in answers):
            exact += float(any(_cmrc_text(answer) == _cmrc_text(prediction) for answer in answers))
            f1 += max(_cmrc_f1(prediction, answer) for answer in answers)
        else:
            exact += float(any(_squad_normalize(answer) == _squad_normalize(prediction) for answer in answers))
            f1 += max(_squad_f1(prediction, answer) for answer in answers)
    return {"exact_match": exact / count, "f1": f1 / count, "count": count}


# ------------------------------------------------------------------------------------------------------ generation

class _RougeTokenizer:
    """For rouge-score: lower-cased; each CJK character a token, other runs of letters and digits a word.

    On ASCII text this is rouge-score's default tokenizer (without stemming); unlike it, Chinese and other
    non-ASCII text is kept rather than dropped.
    """

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall(text.lower())


@functools.cache
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair, from rouge-score: LCS over CJK characters and lower-cased words, punctuation
    ignored. 0.0 when either side has no tokens (so "。" against "！" is 0.0, not a perfect match)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def generation_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, 0-100 scale) and mean ROUGE-L F1 (rouge-score, fraction in [0, 1]).

    Each reference is one string or a list of strings (the number may vary between predictions). BLEU uses
    sacrebleu's "zh" tokenizer when any prediction or reference contains CJK characters, else the standard
    "13a", since 13a would treat a whole Chinese sentence as one word; bleu_tokenize says which was used.
    ROUGE-L (`rouge_l`) takes the best reference for each prediction and averages over predictions.
    `exact_match`: the share of predictions equal to one of their references (ends stripped of whitespace).
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
    scorer = _rouge_scorer()
    rouge = sum(float(scorer.score_multi(answers, hypothesis)["rougeL"].fmeasure)
                for hypothesis, answers in zip(hypotheses, reference_lists))
    exact = sum(hypothesis.strip() in {answer.strip() for answer in answers}
                for hypothesis, answers in zip(hypotheses, reference_lists))
    return {
        "exact_match": exact / count,
        "bleu": float(bleu.score),
        "chrf": float(chrf.score),
        "rouge_l": rouge / count,
        "bleu_tokenize": tokenize,
        "count": count,
    }
