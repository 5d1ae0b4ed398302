import json
import random

import pytest

from llmkit.errors import LlmkitError
from llmkit.metrics import (answer_tokens, classification_metrics, entity_metrics, entity_spans, generation_metrics,
                            rouge_l, squad_metrics)

# Three classes; rows = reference, columns = prediction, in sorted order cat, dog, fish.
REFERENCES = ["cat", "cat", "dog", "dog", "dog", "fish"]
PREDICTIONS = ["cat", "dog", "dog", "dog", "fish", "cat"]


# ------------------------------------------------------------------------------------------------- classification

def test_confusion_matrix_of_three_classes():
    result = classification_metrics(PREDICTIONS, REFERENCES)
    assert result["labels"] == ["cat", "dog", "fish"]
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [1, 0, 0]]


def test_accuracy_and_macro_scores():
    result = classification_metrics(PREDICTIONS, REFERENCES)
    assert result["accuracy"] == pytest.approx(0.5)
    # per-class F1: cat 1/2, dog 2/3, fish 0
    assert result["f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert result["precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert result["recall"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)


def test_per_class_scores_where_precision_and_recall_differ():
    # "a" predicted 3 times, right twice; 2 true "a"s found both times.
    result = classification_metrics(["a", "a", "a", "b"], ["a", "a", "b", "b"])
    assert result["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert result["per_class"]["b"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})


def test_explicit_label_order_orders_the_matrix():
    result = classification_metrics(PREDICTIONS, REFERENCES, labels=["fish", "dog", "cat"])
    assert result["confusion_matrix"] == [[0, 0, 1], [1, 2, 0], [0, 1, 1]]


def test_int_labels_sort_numerically():
    result = classification_metrics([10, 2, 2], [10, 10, 2])
    assert result["labels"] == [2, 10]
    assert result["confusion_matrix"] == [[1, 0], [1, 1]]
    assert set(result["per_class"]) == {"2", "10"}


def test_label_that_never_occurs_counts_as_zero_in_macro_mean():
    result = classification_metrics([0, 1], [0, 1], labels=[0, 1, 2])
    assert result["per_class"]["2"]["support"] == 0
    assert result["f1"] == pytest.approx(2 / 3)


def test_prediction_outside_labels_is_refused():
    with pytest.raises(LlmkitError, match="prediction 1: label 'maybe' is not one of the labels"):
        classification_metrics(["yes", "maybe"], ["yes", "no"], labels=["yes", "no"])


def test_mixed_label_types_are_refused():
    with pytest.raises(LlmkitError, match="labels mix types"):
        classification_metrics(["1", "0"], [1, 0])


# ------------------------------------------------------------------------------------------------------- entities

def test_entity_spans_end_is_exclusive():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}


def test_i_tag_without_b_begins_an_entity():
    assert entity_spans(["I-PER", "I-PER", "O", "I-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}


def test_i_tag_of_another_type_splits_the_entity():
    assert entity_spans(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 3)}


def test_b_tag_after_b_tag_of_same_type_is_two_entities():
    assert entity_spans(["B-ORG", "B-ORG", "I-ORG"]) == {("ORG", 0, 1), ("ORG", 1, 3)}


def test_type_with_a_hyphen_is_kept_whole():
    assert entity_spans(["B-LOC-CITY", "I-LOC-CITY"]) == {("LOC-CITY", 0, 2)}


def test_entity_f1_with_one_boundary_error_and_one_spurious_entity():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"]]
    predictions = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "I-ORG", "B-PER"]]
    result = entity_metrics(predictions, references)
    # 4 predicted, 3 reference, 2 correct (LOC, ORG); PER is one token short.
    assert (result["predicted_entities"], result["reference_entities"], result["correct_entities"]) == (4, 3, 2)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(4 / 7)
    assert result["per_type"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["per_type"]["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}


def test_same_span_in_another_sentence_does_not_match():
    result = entity_metrics([["O"], ["B-PER"]], [["B-PER"], ["O"]])
    assert result["correct_entities"] == 0


def test_bad_tag_is_refused():
    with pytest.raises(LlmkitError, match="'PER' is not a BIO tag"):
        entity_spans(["O", "PER"])


def test_sentence_length_mismatch_is_refused():
    with pytest.raises(LlmkitError, match="sentence 0: 2 predicted tags but 3 reference tags"):
        entity_metrics([["O", "O"]], [["O", "O", "O"]])


# ---------------------------------------------------------------------------------------------------------- SQuAD

def test_answer_tokens_split_cjk_characters_and_keep_english_words():
    # Chinese text: CMRC 2018's segmentation, which keeps English articles (only SQuAD drops them)
    assert answer_tokens("The iPhone 12，在“北京”发布！") == ["the", "iphone", "12", "在", "北", "京", "发", "布"]
    # English text: SQuAD v1.1's normalisation
    assert answer_tokens("The iPhone 12, in Beijing!") == ["iphone", "12", "in", "beijing"]


def test_english_exact_match_after_normalisation_and_best_of_answers():
    result = squad_metrics(["the Eiffel Tower."], [["Paris", "Eiffel Tower"]])
    assert result == {"exact_match": 1.0, "f1": 1.0, "count": 1}


def test_english_partial_answer_f1():
    # tokens eiffel tower in paris vs eiffel tower: P 2/4, R 2/2
    result = squad_metrics(["Eiffel Tower in Paris"], ["the Eiffel Tower"])
    assert result["exact_match"] == 0.0
    assert result["f1"] == pytest.approx(2 / 3)


def test_chinese_exact_match_ignores_full_width_punctuation_and_f1_ignores_spaces():
    assert squad_metrics(["北京大学。"], ["“北京大学”"])["exact_match"] == 1.0
    # CMRC 2018 keeps inner spaces for exact match, but its segmentation drops them for F1
    assert squad_metrics(["北京 大学。"], ["“北京大学”"]) == {"exact_match": 0.0, "f1": 1.0, "count": 1}


def test_chinese_f1_of_a_partial_answer():
    # 位于北京 vs 北京大学: the common substring 北京 is 2 of 4 characters each way
    result = squad_metrics(["北京大学", "位于北京"], ["北京大学", "北京大学"])
    assert result["exact_match"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx((1.0 + 0.5) / 2)


def test_empty_list_of_answers_is_refused():
    with pytest.raises(LlmkitError, match="reference 0: .* expected a string or a non-empty list"):
        squad_metrics(["x"], [[]])


# ----------------------------------------------------------------------------------------------------- generation

def test_bleu_and_chrf_of_identical_strings_are_100():
    result = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert result["bleu"] == pytest.approx(100.0)
    assert result["chrf"] == pytest.approx(100.0)
    assert result["bleu_tokenize"] == "13a"


def test_bleu_of_disjoint_strings_is_about_zero():
    result = generation_metrics(["alpha beta gamma delta epsilon"], ["one two three four five"])
    assert result["bleu"] < 1.0
    assert result["rouge_l"] == 0.0


def test_chinese_switches_bleu_to_zh_tokenizer():
    # per-character n-gram precisions 4/6, 3/5, 2/4, 1/3; same length, so no brevity penalty
    result = generation_metrics(["今天天气很好"], ["今天天气不错"])
    assert result["bleu_tokenize"] == "zh"
    assert result["bleu"] == pytest.approx(100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_rouge_l_of_known_lcs_in_words():
    # LCS "the cat on mat" = 4 of 6 predicted and 5 reference words
    assert rouge_l("The cat sat on the mat.", "the cat on a mat") == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))


def test_rouge_l_of_known_lcs_in_chinese_characters():
    # LCS 我爱天安门 = 5 of 7 characters each way
    assert rouge_l("我爱北京天安门", "我爱天安门广场") == pytest.approx(5 / 7)


def test_generation_takes_best_of_a_varying_number_of_references():
    result = generation_metrics(["我爱北京天安门", "hello world"], [["你好", "我爱北京天安门"], "hello world"])
    assert result["rouge_l"] == pytest.approx(1.0)
    assert result["chrf"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------------------- shared

@pytest.mark.parametrize("score, predictions, references", [
    (classification_metrics, ["a", "b"], ["a"]),
    (entity_metrics, [["O"], ["O"]], [["O"]]),
    (squad_metrics, ["a", "b"], ["a"]),
    (generation_metrics, ["a", "b"], ["a"]),
])
def test_length_mismatch_is_refused(score, predictions, references):
    with pytest.raises(LlmkitError, match="2 predictions but 1 references"):
        score(predictions, references)


def test_results_serialise_to_json():
    results = [classification_metrics([1, 2], [1, 1]), entity_metrics([["B-PER"]], [["B-PER"]]),
               squad_metrics(["a"], ["a"]), generation_metrics(["a b c d"], ["a b c d"])]
    assert json.loads(json.dumps(results)) == results


# ------------------------------------------------------------------------------------- the two fixed scoring bugs

def test_empty_answer_against_empty_reference_scores_f1_zero():
    # as in the SQuAD v1.1 and CMRC 2018 scripts: no tokens in common is F1 0; exact match still holds
    assert squad_metrics([""], [""]) == {"exact_match": 1.0, "f1": 0.0, "count": 1}  # SQuAD v1.1
    assert squad_metrics(["..."], ["!!"]) == {"exact_match": 1.0, "f1": 0.0, "count": 1}
    assert squad_metrics(["。"], [["“”", "北京"]]) == {"exact_match": 1.0, "f1": 0.0, "count": 1}  # CMRC 2018


def test_rouge_l_of_texts_without_tokens_is_zero():
    assert rouge_l("。", "！") == 0.0
    assert rouge_l("", "") == 0.0
    assert generation_metrics(["..."], ["!!!"])["rouge_l"] == 0.0


@pytest.mark.parametrize("prediction, reference, f1", [
    ("北京大", "北大", 0.4),  # longest common substring 北 (or 大): P 1/3, R 1/2; a bag of characters gave 0.8
    ("大学北京", "北京大学", 0.5),  # 北京 or 大学: 2 of 4 each way; a bag of characters gave 1.0
])
def test_chinese_f1_takes_the_longest_common_substring(prediction, reference, f1):
    assert squad_metrics([prediction], [reference])["f1"] == pytest.approx(f1)


def test_question_with_chinese_in_any_answer_is_scored_the_cmrc_way():
    # "the iphone" vs "iphone": SQuAD drops the article (F1 1.0); CMRC keeps it (LCS 1 of 2 and 1 of 1)
    assert squad_metrics(["the iPhone"], ["iPhone"])["f1"] == 1.0
    assert squad_metrics(["the iPhone"], [["iPhone", "苹果手机"]])["f1"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------ reference implementations, transcribed verbatim

# From the CMRC 2018 evaluation script (cmrc2018_evaluate.py, "v5 - special"; also used for DRCD and CLUE),
# with Python 2's str(...).decode("utf-8") dropped and one change: nltk.word_tokenize(..., preserve_line=True),
# because its sentence splitter needs the punkt data, which is not installed and must not be downloaded.
CMRC_SP_CHAR = ['-', ':', '_', '*', '^', '/', '\\', '~', '`', '+', '=',
                '，', '。', '：', '？', '！', '“', '”', '；', '’', '《', '》', '……', '·', '、',
                '「', '」', '（', '）', '－', '～', '『', '』']


def cmrc_mixed_segmentation(in_str, rm_punc=False):
    import re

    import nltk

    in_str = str(in_str).lower().strip()
    segs_out = []
    temp_str = ""
    sp_char = CMRC_SP_CHAR
    for char in in_str:
        if rm_punc and char in sp_char:
            continue
        if re.search(r'[\u4e00-\u9fa5]', char) or char in sp_char:
            if temp_str != "":
                ss = nltk.word_tokenize(temp_str, preserve_line=True)
                segs_out.extend(ss)
                temp_str = ""
            segs_out.append(char)
        else:
            temp_str += char

    # handling last part
    if temp_str != "":
        ss = nltk.word_tokenize(temp_str, preserve_line=True)
        segs_out.extend(ss)

    return segs_out


def cmrc_remove_punctuation(in_str):
    in_str = str(in_str).lower().strip()
    sp_char = CMRC_SP_CHAR
    out_segs = []
    for char in in_str:
        if char in sp_char:
            continue
        else:
            out_segs.append(char)
    return ''.join(out_segs)


def cmrc_find_lcs(s1, s2):
    m = [[0 for i in range(len(s2) + 1)] for j in range(len(s1) + 1)]
    mmax = 0
    p = 0
    for i in range(len(s1)):
        for j in range(len(s2)):
            if s1[i] == s2[j]:
                m[i + 1][j + 1] = m[i][j] + 1
                if m[i + 1][j + 1] > mmax:
                    mmax = m[i + 1][j + 1]
                    p = i + 1
    return s1[p - mmax:p], mmax


def cmrc_calc_f1_score(answers, prediction):
    f1_scores = []
    for ans in answers:
        ans_segs = cmrc_mixed_segmentation(ans, rm_punc=True)
        prediction_segs = cmrc_mixed_segmentation(prediction, rm_punc=True)
        lcs, lcs_len = cmrc_find_lcs(ans_segs, prediction_segs)
        if lcs_len == 0:
            f1_scores.append(0)
            continue
        precision = 1.0 * lcs_len / len(prediction_segs)
        recall = 1.0 * lcs_len / len(ans_segs)
        f1 = (2 * precision * recall) / (precision + recall)
        f1_scores.append(f1)
    return max(f1_scores)


def cmrc_calc_em_score(answers, prediction):
    em = 0
    for ans in answers:
        ans_ = cmrc_remove_punctuation(ans)
        prediction_ = cmrc_remove_punctuation(prediction)
        if ans_ == prediction_:
            em = 1
            break
    return em


# From the official SQuAD v1.1 evaluation script (evaluate-v1.1.py).
def squad_normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""
    import re
    import string

    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def squad_f1_score(prediction, ground_truth):
    from collections import Counter

    prediction_tokens = squad_normalize_answer(prediction).split()
    ground_truth_tokens = squad_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def squad_exact_match_score(prediction, ground_truth):
    return (squad_normalize_answer(prediction) == squad_normalize_answer(ground_truth))


def squad_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


# ------------------------------------------------------------------------------------ checks against the references

CASES = 300
CHINESE = "北京大学上海天安门中国人民的在了一"
CMRC_MARKS = "，。：？！“”《》、（）「」·…-_/+~"
ASCII = "ab iPhone12 .,'\"!?()"


def _text(rng: random.Random, alphabet: str, longest: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def _variant(rng: random.Random, answer: str, alphabet: str) -> str:
    """A prediction near an answer: itself, a piece of it, its characters shuffled, an edit, or unrelated."""
    kind = rng.randrange(5)
    if kind == 0:
        return answer
    if kind == 1:
        start = rng.randint(0, len(answer))
        return answer[start:rng.randint(start, len(answer))]
    if kind == 2:
        return "".join(rng.sample(answer, len(answer)))
    if kind == 3:
        cut = rng.randint(0, len(answer))
        return answer[:cut] + _text(rng, alphabet, 3) + answer[cut:]
    return _text(rng, alphabet, 8)


def test_chinese_qa_matches_the_cmrc_2018_script():
    rng = random.Random(2018)
    alphabet = CHINESE * 3 + CMRC_MARKS + ASCII
    edge = [("", ["北京"]), ("北京", [""]), ("北京大", ["北大"]), ("大学北京", ["北京大学"]),
            ("北京 大学", ["北京大学"]), ("北京.", ["北京。"]), ("a-b北京", ["ab北京"]), ("THE 北京", ["the北京"]),
            ("1998年", ["1998年", "1998"]), ("……北京", ["北京"]), ("“北京”", ["北京", "上海"])]
    cases = list(edge)
    while len(cases) < CASES:
        answers = [rng.choice(CHINESE) + _text(rng, alphabet, 7) for _ in range(rng.randint(1, 3))]
        cases.append((_variant(rng, rng.choice(answers), alphabet), answers))
    for prediction, answers in cases:
        result = squad_metrics([prediction], [answers])
        assert result["exact_match"] == cmrc_calc_em_score(answers, prediction), (prediction, answers)
        assert result["f1"] == cmrc_calc_f1_score(answers, prediction), (prediction, answers)
    together = squad_metrics([p for p, _ in cases], [a for _, a in cases])
    assert together["f1"] == pytest.approx(sum(cmrc_calc_f1_score(a, p) for p, a in cases) / len(cases))
    assert together["exact_match"] == pytest.approx(sum(cmrc_calc_em_score(a, p) for p, a in cases) / len(cases))


def test_english_qa_matches_the_squad_v1_1_script():
    rng = random.Random(11)
    words = ["the", "The", "a", "an", "Eiffel", "tower", "Tower", "in", "Paris", "paris,", "1889", "don't", "U.S.",
             "(France)", "--", "theatre", "and", "'s", "é"]
    edge = [("", [""]), ("", ["Paris"]), ("the", ["a"]), ("Paris", [""]), ("the Eiffel Tower.", ["Eiffel Tower"]),
            ("Eiffel Tower in Paris", ["the Eiffel Tower"]), ("don't", ["dont"]), ("U.S.", ["US", "U.S."])]
    cases = list(edge)
    while len(cases) < CASES:
        answers = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(1, 3))]
        answer = rng.choice(answers).split()
        kind = rng.randrange(4)
        if kind == 0:
            prediction = answer
        elif kind == 1:
            start = rng.randint(0, len(answer))
            prediction = answer[start:rng.randint(start, len(answer))]
        elif kind == 2:
            prediction = rng.sample(answer, len(answer)) + [rng.choice(words)]
        else:
            prediction = [rng.choice(words) for _ in range(rng.randint(0, 5))]
        cases.append((" ".join(prediction), answers))
    for prediction, answers in cases:
        result = squad_metrics([prediction], [answers])
        assert result["exact_match"] == float(
            squad_metric_max_over_ground_truths(squad_exact_match_score, prediction, answers)), (prediction, answers)
        assert result["f1"] == squad_metric_max_over_ground_truths(squad_f1_score, prediction, answers), \
            (prediction, answers)


@pytest.mark.filterwarnings("error")  # llmkit's calls warn of nothing (the references' may: ignored below)
def test_classification_matches_scikit_learn():
    import warnings

    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = random.Random(7)
    for case in range(CASES):
        pool = rng.choice([["cat", "dog", "fish"], [0, 1], [0, 1, 2, 3, 4], ["yes"]])
        references = [rng.choice(pool) for _ in range(rng.randint(1, 20))]
        predictions = [rng.choice(pool) if rng.random() < 0.5 else r for r in references]
        labels = pool if case % 3 == 0 else None  # explicit labels may include classes that never occur
        result = classification_metrics(predictions, references, labels=labels)
        order = labels or sorted(set(predictions) | set(references))
        precision, recall, f1, support = precision_recall_fscore_support(references, predictions, labels=order,
                                                                         zero_division=0)
        macro = precision_recall_fscore_support(references, predictions, labels=order, average="macro",
                                                zero_division=0)
        assert result["accuracy"] == accuracy_score(references, predictions)
        assert (result["precision"], result["recall"], result["f1"]) == tuple(macro[:3])
        assert result["f1"] == f1_score(references, predictions, labels=order, average="macro", zero_division=0)
        with warnings.catch_warnings():  # "A single label was found", even with labels given
            warnings.simplefilter("ignore")
            assert result["confusion_matrix"] == confusion_matrix(references, predictions, labels=order).tolist()
        assert result["per_class"] == {str(label): {"precision": precision[k], "recall": recall[k], "f1": f1[k],
                                                    "support": support[k]} for k, label in enumerate(order)}
        assert all(type(value) is float for value in (result["accuracy"], result["precision"], result["f1"]))


@pytest.mark.filterwarnings("error")
def test_entities_match_seqeval():
    import warnings

    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    rng = random.Random(1)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-LOC-CITY", "I-LOC-CITY"]
    for _ in range(CASES):
        references = [[rng.choice(tags) for _ in range(rng.randint(0, 8))] for _ in range(rng.randint(1, 4))]
        predictions = [[rng.choice(tags) if rng.random() < 0.3 else tag for tag in sentence]
                       for sentence in references]
        result = entity_metrics(predictions, references)
        assert result["precision"] == precision_score(references, predictions, zero_division=0)
        assert result["recall"] == recall_score(references, predictions, zero_division=0)
        assert result["f1"] == f1_score(references, predictions, zero_division=0)
        with warnings.catch_warnings():  # its averages of no entities at all warn
            warnings.simplefilter("ignore")
            report = classification_report(references, predictions, output_dict=True, zero_division=0)
        expected = {kind: {"precision": scores["precision"], "recall": scores["recall"], "f1": scores["f1-score"],
                           "support": scores["support"]}
                    for kind, scores in report.items() if not kind.endswith(" avg")}
        assert result["per_type"] == expected
        assert result["reference_entities"] == sum(scores["support"] for scores in expected.values())


def _lcs_f1(predicted: list, reference: list) -> float:
    """ROUGE-L F1 from a textbook LCS table; 0.0 when either side has no tokens (as rouge-score)."""
    if not predicted or not reference:
        return 0.0
    table = [[0] * (len(reference) + 1) for _ in range(len(predicted) + 1)]
    for i, x in enumerate(predicted):
        for j, y in enumerate(reference):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    common = table[-1][-1]
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_of_english_matches_rouge_score_defaults():
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])  # its own tokenizer: lower-cased runs of [a-z0-9]
    rng = random.Random(3)
    words = ["The", "cat", "sat", "on", "the", "mat", "cat's", "mat.", "A", "b_c", "x-ray", "42", ",", "!"]
    cases = [("", ""), ("...", "!!!"), ("the cat", ""), ("The cat sat on the mat.", "the cat on a mat")]
    while len(cases) < CASES:
        reference = [rng.choice(words) for _ in range(rng.randint(0, 10))]
        prediction = [w for w in reference if rng.random() < 0.7] + [rng.choice(words) for _ in range(rng.randrange(3))]
        if rng.random() < 0.3:
            rng.shuffle(prediction)
        cases.append((" ".join(prediction), " ".join(reference)))
    for prediction, reference in cases:
        assert rouge_l(prediction, reference) == scorer.score(reference, prediction)["rougeL"].fmeasure


def _chinese_tokens(text: str) -> list[str]:
    """Chinese characters one by one, runs of a/b as words, nothing else (the alphabet of the check below)."""
    tokens, run = [], ""
    for char in text.lower() + " ":
        if char in "ab":
            run += char
            continue
        if run:
            tokens.append(run)
            run = ""
        if char in CHINESE:
            tokens.append(char)
    return tokens


def test_rouge_l_of_chinese_scores_characters():
    rng = random.Random(4)
    alphabet = CHINESE + "，。！ ab"
    for _ in range(CASES):
        reference = _text(rng, alphabet, 12)
        prediction = _variant(rng, reference, alphabet)
        expected = _lcs_f1(_chinese_tokens(prediction), _chinese_tokens(reference))
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (prediction, reference)


def test_bleu_and_chrf_match_sacrebleu():
    from sacrebleu import corpus_bleu, corpus_chrf

    rng = random.Random(5)
    for case in range(CASES // 10):  # each case is a small corpus
        alphabet = CHINESE if case % 2 else "abcde "
        references = [_text(rng, alphabet, 12) for _ in range(rng.randint(1, 5))]
        predictions = [_variant(rng, reference, alphabet) for reference in references]
        result = generation_metrics(predictions, references)
        tokenize = "zh" if case % 2 else "13a"
        assert result["bleu_tokenize"] == tokenize
        assert result["bleu"] == corpus_bleu(predictions, [references], tokenize=tokenize).score
        assert result["chrf"] == corpus_chrf(predictions, [references]).score


def test_scoring_downloads_nothing():
    import subprocess
    import sys

    code = """
import socket
def refuse(*args, **kwargs):
    raise AssertionError("tried to reach the network")
socket.socket.connect = refuse
socket.create_connection = refuse
import nltk.downloader
nltk.downloader.Downloader.download = refuse
from llmkit.metrics import entity_metrics, generation_metrics, rouge_l, squad_metrics
assert squad_metrics(["北京 大学。", "The U.S. Army. Now"], ["北京大学", "us army"])["count"] == 2
assert rouge_l("我爱北京", "我爱上海") == 0.5
entity_metrics([["B-PER"]], [["B-PER"]])
generation_metrics(["a b"], ["a b"])
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_generation_exact_match_is_the_share_of_predictions_equal_to_a_reference():
    result = generation_metrics(["jin tian ", "hao", "tian qi"], [["jin tian", "jin ri"], "hao", "tian qi hao"])
    assert result["exact_match"] == pytest.approx(2 / 3)  # ends stripped; any of a row's references counts
