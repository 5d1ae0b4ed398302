"""Text data shared by every command: read documents, split, tokenize and pack into blocks (or, for
BERT's next-sentence prediction, into pairs of sentences).

Sources: a built-in corpus (llmkit.corpora), a local .txt/.jsonl/.csv/.parquet file or a folder of
them, or a Hugging Face hub dataset name. Documents keep their order, so the validation split (the
last fraction of the text) is the same on every run and machine.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llmkit.corpora import BUILTIN_CORPORA, BUILTIN_DATASETS, SPLITS, cache_root
from llmkit.errors import LlmkitError, did_you_mean, first_line
from llmkit.recipe import looks_local
from llmkit.rundir import jsonl_values, read_text
from llmkit.settings import DataSettings
from llmkit.splits import count_chars, split_documents

SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name
CSV_FIELD_LIMIT = 2**31 - 1  # a long document is data, not an error (csv's default limit is 131,072 characters)


@dataclass
class TextSplits:
    train: list[str]
    validation: list[str]
    fingerprint: str  # sha256 of the documents, recorded with every run

    @property
    def validation_chars(self) -> int:
        return count_chars(self.validation)


def load_text_splits(settings: DataSettings) -> TextSplits:
    documents = load_documents(settings.source, settings)
    if settings.max_documents:
        documents = documents[: settings.max_documents]
    if settings.validation_source:
        train, validation = documents, load_documents(settings.validation_source, settings)
    else:
        train, validation = split_documents(documents, settings.validation_fraction)
    if not train or not validation:
        raise LlmkitError(f"data.source {settings.source}: too little text to hold out a validation split "
                          f"({len(documents)} documents)")
    return TextSplits(train, validation, fingerprint(train + validation))


def fingerprint(documents: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        encoded = doc.encode("utf-8")
        digest.update(f"{len(encoded)}:".encode())  # length-prefixed: ["ab", "cd"] differs from ["ab\ncd"]
        digest.update(encoded)
    return digest.hexdigest()


def load_documents(source: str, settings: DataSettings) -> list[str]:
    """All non-empty text documents of a source, in order."""
    rows = load_rows(source, [settings.text_column], settings.document, settings.hub_config, settings.hub_split)
    documents = [row[settings.text_column] for row in rows if row[settings.text_column].strip()]
    if not documents:
        raise LlmkitError(f"data source {source} holds no text")
    return documents


def load_rows(source: str, columns: Sequence[str], document: str = "line", hub_config: str = "",
              hub_split: str = "train", text_columns: int = 1) -> list[dict]:
    """The rows of a source, in order, each checked to carry `columns`, the first `text_columns` of
    them as text. A built-in data set is NAME (its train split) or NAME:SPLIT."""
    name, colon, split = source.partition(":")
    if source in BUILTIN_CORPORA:
        rows = BUILTIN_CORPORA[source]()
        check_columns(rows[0] if rows else {}, columns, text_columns, f"built-in corpus {source}")
    elif name in BUILTIN_DATASETS:
        rows = BUILTIN_DATASETS[name](split if colon else "train")
        check_columns(rows[0] if rows else {}, columns, text_columns, f"built-in data set {source}")
    elif Path(source).exists():
        rows = [row for path in data_files(Path(source)) for row in read_file(path, columns, text_columns, document)]
    elif looks_local(source):
        raise LlmkitError(f"data source not found: {source} (no such file or folder)")
    elif HUB_NAME.fullmatch(source) and not source.endswith(SUFFIXES):
        rows = read_hub_dataset(source, columns, text_columns, hub_config, hub_split)
    else:
        hint = did_you_mean(name, [*BUILTIN_CORPORA, *BUILTIN_DATASETS])
        raise LlmkitError(f"data source not found: {source}{hint} (expected a file, a folder, a hub dataset "
                          f"'owner/name', a built-in corpus: {', '.join(BUILTIN_CORPORA)}, or a built-in data set "
                          f"NAME or NAME:SPLIT ({'|'.join(SPLITS)}): {', '.join(BUILTIN_DATASETS)})")
    if not rows:
        raise LlmkitError(f"data source {source} holds no text")
    return rows


def data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise LlmkitError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise LlmkitError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
    return files


def read_file(path: Path, columns: Sequence[str], text_columns: int, document: str) -> list[dict]:
    if path.suffix == ".txt":
        if len(columns) > 1:
            raise LlmkitError(f"{path}: a .txt file holds only text; give {', '.join(columns)} in .jsonl or .csv")
        text = read_text(path)
        return [{columns[0]: doc} for doc in ([text] if document == "file" else text.splitlines())]
    readers = {".jsonl": read_jsonl, ".csv": read_csv, ".parquet": read_parquet}
    return readers[path.suffix](path, columns, text_columns)


def read_jsonl(path: Path, columns: Sequence[str], text_columns: int) -> list[dict]:
    return [check_columns(row, columns, text_columns, where) for where, row in jsonl_values(path)]


def read_csv(path: Path, columns: Sequence[str], text_columns: int) -> list[dict]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    default_limit = csv.field_size_limit(CSV_FIELD_LIMIT)  # a process-wide setting: put back when done
    try:
        check_header(reader.fieldnames or [], columns, str(path))
        return [check_columns(row, columns, text_columns, f"{path}:{reader.line_num}") for row in reader]
    finally:
        csv.field_size_limit(default_limit)


def read_parquet(path: Path, columns: Sequence[str], text_columns: int) -> list[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise LlmkitError(f"{path}: not a readable Parquet file ({first_line(error)})") from None
    check_header(table.column_names, columns, str(path))
    return [check_columns(row, columns, text_columns, f"{path}: row {number}")
            for number, row in enumerate(table.to_pylist(), 1)]


def read_hub_dataset(name: str, columns: Sequence[str], text_columns: int, config: str, split: str) -> list[dict]:
    """A hub split's rows: only the columns asked for (a wide data set stays small), or every column when
    none are named (fine-tuning chat data: its task module reads the fields it finds, like a file's)."""
    import datasets

    dataset = datasets.load_dataset(name, config or None, split=split)
    check_header(dataset.column_names, columns, f"hub dataset {name}")
    rows = (dataset.select_columns(list(columns)) if columns else dataset).to_list()
    return [check_columns(row, columns, text_columns, f"hub dataset {name}: row {n}") for n, row in enumerate(rows, 1)]


def check_header(names: Sequence[str], columns: Sequence[str], where: str) -> None:
    missing = [column for column in columns if column not in names]
    if missing:
        raise LlmkitError(f"{where}: no column '{missing[0]}'{did_you_mean(missing[0], names)} "
                          f"(columns: {list(names)}); set the recipe's column names")


def check_columns(row: object, columns: Sequence[str], text_columns: int, where: str) -> dict:
    """A row that has every column, the first `text_columns` of them strings."""
    if not isinstance(row, dict):
        raise LlmkitError(f"{where}: expected a JSON object with {', '.join(repr(c) for c in columns)}")
    for column in columns:
        if column not in row:
            raise LlmkitError(f"{where}: expected a '{column}' field{did_you_mean(column, row)} "
                              f"(fields: {list(row)}); set the recipe's column names")
        if row[column] is None:
            raise LlmkitError(f"{where}: expected a '{column}' field, found it empty")
    for column in columns[:text_columns]:
        if not isinstance(row[column], str):
            raise LlmkitError(f"{where}: expected the '{column}' field to be text, got {row[column]!r}")
    return row


def blocks_cache() -> Path:
    """Where tokenized, packed blocks are cached (by content): $LLMKIT_CACHE/blocks."""
    return cache_root() / "blocks"


def pack_blocks(documents: list[str], tokenizer, block_size: int, cache_dir: Path | None = None):
    """Tokenize documents (each closed by the end-of-sequence token) and cut the token stream into
    blocks of block_size, through datasets.map, cached by content under cache_dir."""
    import datasets

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    key = hashlib.sha256(f"{fingerprint(documents)}|{tokenizer_hash(tokenizer)}|{block_size}".encode()).hexdigest()

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch["text"])["input_ids"]]}

    def group(batch):
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) - len(stream) % block_size
        return {"input_ids": [stream[i: i + block_size] for i in range(0, usable, block_size)]}

    def cache(stage: str) -> str | None:
        return str(cache_dir / f"{key[:24]}-{stage}.arrow") if cache_dir else None

    texts = datasets.Dataset.from_dict({"text": documents})
    tokens = texts.map(tokenize, batched=True, remove_columns=["text"], cache_file_name=cache("tokens"),
                       desc="tokenizing")
    blocks = tokens.map(group, batched=True, batch_size=1000, cache_file_name=cache("blocks"), desc="packing")
    return blocks, token_count(tokens)


def token_count(tokens) -> int:
    """The tokens of a tokenized dataset, counted in Arrow: its rows never become Python lists (a billion
    tokens would take tens of GB as Python ints)."""
    import pyarrow.compute as pc

    return pc.sum(pc.list_value_length(tokens.data.column("input_ids"))).as_py() or 0


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


# ---------------------------------------------------------------- next-sentence prediction (train.objective = "mlm+nsp")

SENTENCE_END = re.compile(r"(?<=[。！？!?；;])|\n")  # a sentence ends after these (Chinese and Western), or at a line break
IS_NEXT, NOT_NEXT = 0, 1  # next_sentence_label as BertForPreTraining reads it


def sentences(document: str) -> list[str]:
    """A document's sentences, cut after sentence-ending punctuation, without the empty ones."""
    return [part.strip() for part in SENTENCE_END.split(document) if part.strip()]


def sentence_pairs(documents: list[str], seed: int) -> list[tuple[str, str, int]]:
    """BERT's next-sentence prediction data: for every two consecutive sentences (A, B) of a document,
    (A, B, IS_NEXT), or, half the time (seeded), (A, C, NOT_NEXT) with C a random sentence of another
    document. Documents of one sentence pair with nothing but can be another's C."""
    rng = random.Random(seed)
    split = [sentences(doc) for doc in documents]
    pool = [(index, sentence) for index, found in enumerate(split) for sentence in found]
    several = len({index for index, _ in pool}) > 1  # a random sentence of another document exists
    pairs = []
    for index, found in enumerate(split):
        for first, second in zip(found, found[1:]):
            if several and rng.random() < 0.5:
                other, sentence = pool[rng.randrange(len(pool))]
                while other == index:
                    other, sentence = pool[rng.randrange(len(pool))]
                pairs.append((first, sentence, NOT_NEXT))
            else:
                pairs.append((first, second, IS_NEXT))
    return pairs


def encode_pairs(pairs: list[tuple[str, str, int]], tokenizer, max_length: int):
    """Sentence pairs as a datasets.Dataset of `[CLS] A [SEP] B [SEP]` (the longer sentence cut first to fit
    max_length tokens), segment ids (token_type_ids: 0 for A, 1 for B) and next_sentence_label."""
    import datasets

    if not pairs:
        return datasets.Dataset.from_dict({"input_ids": [], "token_type_ids": [], "attention_mask": [],
                                           "next_sentence_label": []})
    firsts, seconds, labels = zip(*pairs)
    encoded = tokenizer(list(firsts), list(seconds), truncation="longest_first", max_length=max_length,
                        return_token_type_ids=True, return_attention_mask=True)
    return datasets.Dataset.from_dict({"input_ids": encoded["input_ids"], "token_type_ids": encoded["token_type_ids"],
                                       "attention_mask": encoded["attention_mask"],
                                       "next_sentence_label": list(labels)})
