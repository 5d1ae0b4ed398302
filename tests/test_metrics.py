import json

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
    assert answer_tokens("The iPhone 12，在“北京”发布！") == ["iphone", "12", "在", "北", "京", "发", "布"]


def test_english_exact_match_after_normalisation_and_best_of_answers():
    result = squad_metrics(["the Eiffel Tower."], [["Paris", "Eiffel Tower"]])
    assert result == {"exact_match": 1.0, "f1": 1.0, "count": 1}


def test_english_partial_answer_f1():
    # tokens eiffel tower in paris vs eiffel tower: P 2/4, R 2/2
    result = squad_metrics(["Eiffel Tower in Paris"], ["the Eiffel Tower"])
    assert result["exact_match"] == 0.0
    assert result["f1"] == pytest.approx(2 / 3)


def test_chinese_exact_match_ignores_spaces_and_full_width_punctuation():
    assert squad_metrics(["北京 大学。"], ["“北京大学”"])["exact_match"] == 1.0


def test_chinese_f1_counts_characters():
    # 位于北京 vs 北京大学: 2 of 4 characters in common each way
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
