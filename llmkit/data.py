"""Text data shared by every command: read documents, split, tokenize and pack into blocks (or, for
BERT's next-sentence prediction, into pairs of sentences).

Sources: a built-in corpus (llmkit.corpora), a local .txt/.jsonl/.csv/.parquet file or a folder of
them, or a Hugging Face hub dataset name. Documents keep their order, so the validation split (the
last fraction of the text) is the same on every run and machine.

A corpus never becomes a Python list: files are read line by line into Arrow files (cached, memory-mapped),
a hub dataset is its own Arrow cache, and every pass over one (splitting, hashing, tokenizing) reads it a
batch at a time. With data.streaming nothing is copied at all: the documents are read as training asks
for them (a datasets.IterableDataset), the first data.validation_documents held out for validation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from llmkit.corpora import BUILTIN_CORPORA, BUILTIN_DATASETS, SPLITS, cache_root
from llmkit.errors import LlmkitError, did_you_mean, first_line
from llmkit.recipe import looks_local
from llmkit.rundir import jsonl_lines, read_text, text_lines
from llmkit.settings import DataSettings
from llmkit.splits import held_out_start

SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name
CSV_FIELD_LIMIT = 2**31 - 1  # a long document is data, not an error (csv's default limit is 131,072 characters)
LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # where a lone carriage return ends a line (csv reads "\r", "\n", "\r\n")
BATCH = 10_000  # documents per batch on a pass over a corpus (counting, hashing)
PACK_BATCH = 1000  # tokenized documents packed together; the tail of each batch shorter than a block is dropped
SHUFFLE_BLOCKS = 1000  # data.streaming: training blocks are drawn at random from a buffer of this many
READER_VERSION = 1  # raise it when reading a file changes: the Arrow copies made by the old reader are then not used


@dataclass
class TextSplits:
    """A corpus's documents, as `datasets` data with one "text" column: the validation split a Dataset, the
    training split a Dataset too, or with data.streaming an IterableDataset read as training goes."""

    train: Any  # datasets.Dataset | datasets.IterableDataset
    validation: Any  # datasets.Dataset
    fingerprint: str  # sha256 of the documents (streamed: of the files' names, sizes and times), recorded with every run

    @property
    def streamed(self) -> bool:
        import datasets

        return isinstance(self.train, datasets.IterableDataset)

    @cached_property
    def validation_chars(self) -> int:
        return dataset_chars(self.validation)


def load_text_splits(settings: DataSettings) -> TextSplits:
    if settings.streaming:
        return stream_text_splits(settings)
    documents = document_dataset(settings.source, settings)
    if settings.max_documents:
        documents = documents.select(range(min(settings.max_documents, len(documents))))
    if settings.validation_source:
        train, validation = documents, document_dataset(settings.validation_source, settings)
    else:
        start = held_out_start(char_counts(documents), dataset_chars(documents), settings.validation_fraction)
        if start == len(documents):  # nothing left to hold out
            raise too_little_text(settings, len(documents))
        train, validation = documents.select(range(start)), documents.select(range(start, len(documents)))
    return TextSplits(train, validation, fingerprint(chain(texts(train), texts(validation))))


def stream_text_splits(settings: DataSettings) -> TextSplits:
    """data.streaming: the training documents as an IterableDataset that reads the source as training asks
    for them; validation is data.validation_source, or the first data.validation_documents of the stream
    (then not trained on)."""
    import datasets

    documents = document_stream(settings.source, settings)
    if settings.max_documents:
        documents = documents.take(settings.max_documents)
    if settings.validation_source:
        train, validation = documents, document_dataset(settings.validation_source, settings)
    else:
        held = [row["text"] for row in islice(documents, settings.validation_documents)]
        train, validation = documents.skip(len(held)), datasets.Dataset.from_dict({"text": held}, text_features())
    if not len(validation) or next(iter(train), None) is None:
        raise too_little_text(settings, len(validation))
    return TextSplits(train, validation, stream_fingerprint(settings))


def too_little_text(settings: DataSettings, documents: int) -> LlmkitError:
    return LlmkitError(f"data.source {settings.source}: too little text to hold out a validation split "
                       f"({documents} documents)")


def fingerprint(documents: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        encoded = doc.encode("utf-8")
        digest.update(f"{len(encoded)}:".encode())  # length-prefixed: ["ab", "cd"] differs from ["ab\ncd"]
        digest.update(encoded)
    return digest.hexdigest()


def stream_fingerprint(settings: DataSettings) -> str:
    """A streamed corpus is not read ahead to be hashed: its fingerprint is that of how it is read (source_stamp)."""
    sources = [source_stamp(source, settings) for source in (settings.source, settings.validation_source) if source]
    return hashlib.sha256(json.dumps([sources, settings.max_documents, settings.validation_documents]).encode()).hexdigest()


def source_stamp(source: str, settings: DataSettings) -> list:
    """What identifies a source's documents without reading it: for files, each one's path, size and
    modification time; for the hub and built-in sources, the name (and configuration, split); and how its
    text is read."""
    how = [source, settings.text_column, settings.document, READER_VERSION]
    if where(source) != "local":
        return [*how, settings.hub_config, settings.hub_split]
    return [*how, *([str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
                    for path in data_files(Path(source)))]


def texts(documents, limit: int = 0) -> Iterator[str]:
    """The text of each document of a Dataset or IterableDataset (with a `limit`, of the first `limit` only:
    a stream is read no further), read a batch at a time."""
    if limit:
        documents = documents.take(min(limit, len(documents)) if hasattr(documents, "__len__") else limit)
    for batch in documents.iter(batch_size=BATCH):
        yield from batch["text"]


def char_counts(documents) -> Iterator:
    """Each document's characters plus one (llmkit.splits.count_chars), a numpy array per batch, counted in Arrow."""
    import pyarrow.compute as pc

    for batch in documents.with_format("arrow").iter(batch_size=BATCH):
        yield pc.add(pc.utf8_length(batch["text"]), 1).to_numpy()


def dataset_chars(documents) -> int:
    """llmkit.splits.count_chars of a Dataset's documents."""
    return sum(int(counts.sum()) for counts in char_counts(documents))


def text_features():
    import datasets

    return datasets.Features({"text": datasets.Value("string")})


# ---------------------------------------------------------------- sources


def where(source: str) -> str:
    """Which kind of source this is: "corpus" (built-in), "dataset" (a built-in data set, NAME or NAME:SPLIT),
    "local" (a file or folder) or "hub"; one that is none of them is an error."""
    name = source.partition(":")[0]
    if source in BUILTIN_CORPORA:
        return "corpus"
    if name in BUILTIN_DATASETS:
        return "dataset"
    if Path(source).exists():
        return "local"
    if looks_local(source):
        raise LlmkitError(f"data source not found: {source} (no such file or folder)")
    if HUB_NAME.fullmatch(source) and not source.endswith(SUFFIXES):
        return "hub"
    hint = did_you_mean(name, [*BUILTIN_CORPORA, *BUILTIN_DATASETS])
    raise LlmkitError(f"data source not found: {source}{hint} (expected a file, a folder, a hub dataset "
                      f"'owner/name', a built-in corpus: {', '.join(BUILTIN_CORPORA)}, or a built-in data set "
                      f"NAME or NAME:SPLIT ({'|'.join(SPLITS)}): {', '.join(BUILTIN_DATASETS)})")


def document_dataset(source: str, settings: DataSettings):
    """All non-empty text documents of a source, in order, as a datasets.Dataset with one "text" column. Files
    are read once into Arrow files under $LLMKIT_CACHE/documents (again when one changes: source_stamp) and
    memory-mapped from there; a hub dataset is read from the hub's own Arrow cache; a built-in source is small."""
    import datasets

    kind = where(source)
    if kind == "local":
        documents = from_generator(datasets.Dataset.from_generator, source, settings,
                                   cache_dir=str(cache_root() / "documents"),
                                   fingerprint=hashlib.sha256(json.dumps(source_stamp(source, settings)).encode())
                                   .hexdigest())
    elif kind == "hub":
        documents = hub_documents(source, settings, streaming=False)
    else:
        rows = load_rows(source, [settings.text_column], settings.document, settings.hub_config, settings.hub_split)
        documents = datasets.Dataset.from_dict(
            {"text": [row[settings.text_column] for row in rows if row[settings.text_column].strip()]}, text_features())
    if len(documents) == 0:
        raise LlmkitError(f"data source {source} holds no text")
    return documents


def document_stream(source: str, settings: DataSettings):
    """The non-empty text documents of a source as a datasets.IterableDataset: read as they are asked for, in
    one shard whatever the source's files (DataLoader workers would each read a share of the shards, and the
    documents held out or kept, `skip` and `take`, would be counted in each share)."""
    import datasets

    kind = where(source)
    if kind == "local":
        return from_generator(datasets.IterableDataset.from_generator, source, settings)
    if kind == "hub":
        shards = hub_documents(source, settings, streaming=True)
        return datasets.IterableDataset.from_generator(read_through, text_features(), gen_kwargs={"documents": shards})
    return document_dataset(source, settings).to_iterable_dataset()  # one shard


def read_through(documents) -> Iterator[dict]:
    """Each row of an IterableDataset, all of them even in a DataLoader worker (iterated as such, it would read
    only that worker's shards)."""
    for batch in documents.iter(batch_size=PACK_BATCH):
        yield from ({"text": text} for text in batch["text"])


def from_generator(make, source: str, settings: DataSettings, **options):
    """A Dataset or IterableDataset (`make`: its from_generator) of the documents of a local source's files;
    an error in a file is raised as llmkit's own (datasets wraps what a generator raises)."""
    import datasets

    # The files as a tuple: datasets makes a list in gen_kwargs into shards, read apart (document_stream).
    reading = {"files": tuple(str(path) for path in data_files(Path(source))), "column": settings.text_column,
               "document": settings.document}
    if next(file_documents(**reading), None) is None:  # read up to the first document only
        raise LlmkitError(f"data source {source} holds no text")
    try:
        return make(file_documents, text_features(), gen_kwargs=reading, **options)
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, LlmkitError):
            raise error.__cause__ from None
        raise


def file_documents(files: Sequence[str], column: str, document: str) -> Iterator[dict]:
    """{"text": ...} for each non-empty document of the files, read as they are asked for."""
    for path in files:
        for row in file_rows(Path(path), [column], 1, document):
            if row[column].strip():
                yield {"text": row[column]}


def hub_documents(name: str, settings: DataSettings, streaming: bool):
    """A hub dataset's non-empty texts, in a "text" column (each row checked to hold text)."""
    import datasets

    column = settings.text_column
    dataset = datasets.load_dataset(name, settings.hub_config or None, split=settings.hub_split, streaming=streaming)
    if dataset.column_names is not None:  # a stream may not know its columns before it is read
        check_header(dataset.column_names, [column], f"hub dataset {name}")

    def non_empty(batch, indices):
        rows = ({column: text} for text in batch[column])
        return [check_columns(row, [column], 1, f"hub dataset {name}: row {n + 1}")[column].strip() != ""
                for n, row in zip(indices, rows)]

    documents = dataset.select_columns([column]).filter(non_empty, batched=True, with_indices=True)
    return documents if column == "text" else documents.rename_column(column, "text")


def load_rows(source: str, columns: Sequence[str], document: str = "line", hub_config: str = "",
              hub_split: str = "train", text_columns: int = 1) -> list[dict]:
    """The rows of a source, in order, each checked to carry `columns`, the first `text_columns` of
    them as text. A built-in data set is NAME (its train split) or NAME:SPLIT."""
    name, colon, split = source.partition(":")
    kind = where(source)
    if kind == "corpus":
        rows = BUILTIN_CORPORA[source]()
        check_columns(rows[0] if rows else {}, columns, text_columns, f"built-in corpus {source}")
    elif kind == "dataset":
        rows = BUILTIN_DATASETS[name](split if colon else "train")
        check_columns(rows[0] if rows else {}, columns, text_columns, f"built-in data set {source}")
    elif kind == "local":
        rows = [row for path in data_files(Path(source)) for row in file_rows(path, columns, text_columns, document)]
    else:
        rows = read_hub_dataset(source, columns, text_columns, hub_config, hub_split)
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


def file_rows(path: Path, columns: Sequence[str], text_columns: int, document: str) -> Iterator[dict]:
    """The rows of a file, read as they are asked for (a .txt file as one document: at once)."""
    if path.suffix == ".txt":
        if len(columns) > 1:
            raise LlmkitError(f"{path}: a .txt file holds only text; give {', '.join(columns)} in .jsonl or .csv")
        if document == "file":
            yield {columns[0]: read_text(path)}
        else:
            for _, line in text_lines(path):
                yield from ({columns[0]: doc} for doc in line.splitlines())
        return
    readers = {".jsonl": jsonl_rows, ".csv": csv_rows, ".parquet": parquet_rows}
    yield from readers[path.suffix](path, columns, text_columns)


def jsonl_rows(path: Path, columns: Sequence[str], text_columns: int) -> Iterator[dict]:
    for place, row in jsonl_lines(path):
        yield check_columns(row, columns, text_columns, place)


def csv_rows(path: Path, columns: Sequence[str], text_columns: int) -> Iterator[dict]:
    lines = (part for _, line in text_lines(path) for part in LONE_CR.split(line) if part)
    reader = csv.DictReader(lines)
    default_limit = csv.field_size_limit(CSV_FIELD_LIMIT)  # a process-wide setting: put back when done
    try:
        check_header(reader.fieldnames or [], columns, str(path))
        for row in reader:
            yield check_columns(row, columns, text_columns, f"{path}:{reader.line_num}")
    finally:
        csv.field_size_limit(default_limit)


def parquet_rows(path: Path, columns: Sequence[str], text_columns: int) -> Iterator[dict]:
    """A Parquet file's rows, a row group's batch at a time."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        check_header(file.schema_arrow.names, columns, str(path))
        number = 0
        for batch in file.iter_batches():
            for row in batch.to_pylist():
                number += 1
                yield check_columns(row, columns, text_columns, f"{path}: row {number}")
    except (pyarrow.ArrowException, OSError) as error:
        raise LlmkitError(f"{path}: not a readable Parquet file ({first_line(error)})") from None


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


def pack_blocks(documents, tokenizer, block_size: int, cache_dir: Path | None = None):
    """Tokenize documents (a list of texts, or a Dataset with a "text" column), each closed by the
    end-of-sequence token, and cut the token stream into blocks of block_size, through datasets.map, cached
    by content under cache_dir."""
    import datasets

    if isinstance(documents, list):
        documents = datasets.Dataset.from_dict({"text": documents}, text_features())
    key = hashlib.sha256(f"{fingerprint(texts(documents))}|{tokenizer_hash(tokenizer)}|{block_size}".encode()).hexdigest()
    tokenize, group = block_steps(tokenizer, block_size)

    def cache(stage: str) -> str | None:
        return str(cache_dir / f"{key[:24]}-{stage}.arrow") if cache_dir else None

    tokens = documents.map(tokenize, batched=True, remove_columns=["text"], cache_file_name=cache("tokens"),
                           desc="tokenizing")
    blocks = tokens.map(group, batched=True, batch_size=PACK_BATCH, cache_file_name=cache("blocks"), desc="packing")
    return blocks, token_count(tokens)


def stream_blocks(documents, tokenizer, block_size: int):
    """pack_blocks of an IterableDataset: the same blocks, tokenized and packed as they are read."""
    import datasets

    tokenize, group = block_steps(tokenizer, block_size)
    blocks = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})
    return (documents.map(tokenize, batched=True, remove_columns=["text"])
            .map(group, batched=True, batch_size=PACK_BATCH, features=blocks))


def block_steps(tokenizer, block_size: int):
    """The two steps of packing, as batched map functions: tokenize (each document closed by the
    end-of-sequence token), then group the tokens of a batch of documents into blocks."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch["text"])["input_ids"]]}

    def group(batch):
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) - len(stream) % block_size
        return {"input_ids": [stream[i: i + block_size] for i in range(0, usable, block_size)]}

    return tokenize, group


def training_blocks(splits: TextSplits, tokenizer, block_size: int, seed: int):
    """The training split packed into blocks (pack_blocks, cached), or a streamed one's blocks packed as
    training reads them and drawn at random from a buffer of SHUFFLE_BLOCKS (seeded)."""
    if splits.streamed:
        return stream_blocks(splits.train, tokenizer, block_size).shuffle(seed=seed, buffer_size=SHUFFLE_BLOCKS)
    return pack_blocks(splits.train, tokenizer, block_size, blocks_cache())[0]


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
