"""Reading data sources and packing them into blocks (llmkit/data.py), and the held-out rule of text
corpora (llmkit/splits.py)."""

import json
import re
from itertools import islice

import pytest

from llmkit.data import document_dataset, fingerprint, load_rows, load_text_splits, pack_blocks, texts
from llmkit.errors import LlmkitError
from llmkit.settings import DataSettings, TokenizerSettings
from llmkit.splits import count_chars, split_documents
from llmkit.tokenizer import train_tokenizer

DOCS = [f"第{i}篇 document {i}" + "。" * (i % 3) for i in range(20)]


def load(source, **settings) -> list[str]:
    return list(texts(document_dataset(str(source), DataSettings(source=str(source), **settings))))


def documents(splits) -> tuple[list[str], list[str]]:
    """The texts of the training and validation splits."""
    return list(texts(splits.train)), list(texts(splits.validation))


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def peoples_daily():
    return load_text_splits(DataSettings())


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS * 5, TokenizerSettings(vocab_size=200), "causal")


# split_documents and load_text_splits


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_split_holds_out_the_tail_as_whole_documents(fraction):
    train, validation = split_documents(DOCS, fraction)
    assert train + validation == DOCS and train and validation
    assert count_chars(train) >= (1 - fraction) * count_chars(DOCS)
    assert count_chars(train[:-1]) < (1 - fraction) * count_chars(DOCS)  # the first document that reaches it


def test_split_of_the_builtin_corpus_is_deterministic():
    settings = DataSettings(max_documents=500)
    first, second = load_text_splits(settings), load_text_splits(settings)
    assert first.fingerprint == second.fingerprint and documents(first) == documents(second)
    assert first.fingerprint == fingerprint(sum(documents(first), []))


def test_builtin_corpus_has_no_pos_tags_and_about_19k_documents(peoples_daily):
    every = sum(documents(peoples_daily), [])
    assert 18_000 < len(every) < 21_000
    assert not [doc for doc in every if re.search(r"/[a-zA-Z]", doc)]
    assert every[0].startswith("迈向充满希望的新世纪")


def test_builtin_validation_is_about_the_requested_fraction(peoples_daily):
    total = count_chars(documents(peoples_daily)[0]) + peoples_daily.validation_chars
    assert 0.09 < peoples_daily.validation_chars / total <= 0.1


def test_max_documents_keeps_the_first_documents(tmp_path):
    path = write(tmp_path / "c.txt", "\n".join(DOCS))
    splits = load_text_splits(DataSettings(source=str(path), max_documents=4, validation_fraction=0.3))
    assert sum(documents(splits), []) == DOCS[:4]


def test_validation_source_replaces_the_split(tmp_path):
    train = write(tmp_path / "train.txt", "\n".join(DOCS))
    validation = write(tmp_path / "val.txt", "held out one\nheld out two\n")
    splits = load_text_splits(DataSettings(source=str(train), validation_source=str(validation)))
    assert documents(splits) == (DOCS, ["held out one", "held out two"])


def test_too_little_text_to_split_is_refused(tmp_path):
    path = write(tmp_path / "one.txt", "only one document\n")
    with pytest.raises(LlmkitError, match="too little text to hold out a validation split"):
        load_text_splits(DataSettings(source=str(path)))


# local sources


def test_txt_is_one_document_per_non_empty_line(tmp_path):
    path = write(tmp_path / "c.txt", "first line\n\n   \nsecond line\r\nthird\n")
    assert load(path) == ["first line", "second line", "third"]


def test_txt_as_one_document_per_file(tmp_path):
    path = write(tmp_path / "c.txt", "first line\nsecond line\n")
    assert load(path, document="file") == ["first line\nsecond line\n"]


def test_jsonl_reads_the_text_column(tmp_path):
    rows = [{"body": "甲", "id": 1}, {"body": "乙\n丙", "id": 2}]
    path = write(tmp_path / "c.jsonl", "\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n\n")
    assert load(path, text_column="body") == ["甲", "乙\n丙"]


def test_csv_reads_the_text_column_with_quoted_newlines(tmp_path):
    path = write(tmp_path / "c.csv", 'id,text\n1,"hello, world"\n2,"two\nlines"\n')
    assert load(path) == ["hello, world", "two\nlines"]


def test_parquet_reads_the_text_column_and_splits_as_the_same_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmkit import load_recipe

    # A decoy "text" column (the default name) makes a reader that ignores data.text_column give other texts.
    rows = [{"id": i, "text": f"title {i}", "body": body} for i, body in enumerate(DOCS[:9] + ["  ", "两\n行"])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    write(tmp_path / "c.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def splits(name):
        recipe = load_recipe(None, [f"data.source={tmp_path / name}", "data.text_column=body",
                                    "data.validation_fraction=0.3"])
        return load_text_splits(recipe.data)

    parquet, jsonl = splits("c.parquet"), splits("c.jsonl")
    assert sum(documents(parquet), []) == DOCS[:9] + ["两\n行"]  # in order, the blank row dropped
    assert documents(parquet) == documents(jsonl) and documents(jsonl)[1]
    assert parquet.fingerprint == jsonl.fingerprint


def test_folder_reads_its_files_in_sorted_order_recursively(tmp_path):
    write(tmp_path / "b.txt", "from b\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.jsonl", '{"text": "from c"}\n')
    write(tmp_path / "a.csv", "text\nfrom a\n")
    write(tmp_path / "notes.md", "ignored\n")
    assert load(tmp_path) == ["from a", "from b", "from c"]


# bad input: the message names the file and the line


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{oops\n')
    with pytest.raises(LlmkitError, match=r"bad\.jsonl:3: not a JSON object"):
        load(path)


def test_jsonl_row_without_the_text_field_names_line_and_field(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(LlmkitError, match=r"rows\.jsonl:2: expected a 'text' field"):
        load(path)


def test_jsonl_non_utf8_line_is_a_clear_error(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(LlmkitError, match=r"latin\.jsonl:2"):
        load(path)


def test_csv_without_the_text_column_names_the_column(tmp_path):
    path = write(tmp_path / "c.csv", "id,body\n1,hello\n")
    with pytest.raises(LlmkitError, match=r"c\.csv: no column 'text' \(columns: \['id', 'body'\]\)"):
        load(path)


def test_csv_row_missing_the_text_names_the_line(tmp_path):
    path = write(tmp_path / "short.csv", "id,text\n1,fine\n2\n")
    with pytest.raises(LlmkitError, match=r"short\.csv:3: expected a 'text' field"):
        load(path)


def test_non_utf8_txt_names_the_line(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("第一行\nsecond\n".encode() + b"caf\xe9\n")
    with pytest.raises(LlmkitError, match=r"latin\.txt:3: not UTF-8 text"):
        load(path)


@pytest.mark.parametrize("name, text", [("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.jsonl", "\n")])
def test_source_without_text_is_refused(tmp_path, name, text):
    with pytest.raises(LlmkitError, match="holds no text"):
        load(write(tmp_path / name, text))


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(LlmkitError, match="data source not found"):
        load(tmp_path / "missing.txt")


def test_unsupported_file_type_is_refused(tmp_path):
    with pytest.raises(LlmkitError, match=r"notes\.md: unsupported file type"):
        load(write(tmp_path / "notes.md", "text\n"))


def test_folder_without_data_files_is_refused(tmp_path):
    write(tmp_path / "notes.md", "text\n")
    with pytest.raises(LlmkitError, match="folder holds no"):
        load(tmp_path)


# pack_blocks


def token_stream(documents, tokenizer) -> list[int]:
    return [token for doc in documents for token in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]


def test_blocks_are_the_token_stream_cut_into_block_size(tokenizer, tmp_path):
    blocks, n_tokens = pack_blocks(DOCS, tokenizer, block_size=8, cache_dir=tmp_path)
    stream = token_stream(DOCS, tokenizer)
    assert n_tokens == len(stream)
    assert len(blocks) == len(stream) // 8
    assert all(len(block) == 8 for block in blocks["input_ids"])
    assert sum(blocks["input_ids"], []) == stream[: len(blocks) * 8]


def test_second_call_reuses_the_cached_blocks(tokenizer, tmp_path):
    first, _ = pack_blocks(DOCS, tokenizer, block_size=8, cache_dir=tmp_path)
    cached = sorted(p.name for p in tmp_path.glob("*.arrow"))
    assert len(cached) == 2 and first.cache_files[0]["filename"].startswith(str(tmp_path))

    class NoTokenizing:  # same identity (hash, eos) as the tokenizer, but refuses to tokenize
        backend_tokenizer, eos_token_id = tokenizer.backend_tokenizer, tokenizer.eos_token_id

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized again instead of reading the cache")

    second, n_tokens = pack_blocks(DOCS, NoTokenizing(), block_size=8, cache_dir=tmp_path)
    assert second["input_ids"] == first["input_ids"] and n_tokens == len(token_stream(DOCS, tokenizer))
    assert sorted(p.name for p in tmp_path.glob("*.arrow")) == cached


def test_cache_key_tells_documents_apart_from_their_joined_lines(tokenizer, tmp_path):
    as_lines, _ = pack_blocks(["ab", "cd"], tokenizer, block_size=2, cache_dir=tmp_path)
    as_file, _ = pack_blocks(["ab\ncd"], tokenizer, block_size=2, cache_dir=tmp_path)
    assert as_file["input_ids"] != as_lines["input_ids"]


# files that are not what they claim, names that do not exist


def test_csv_reads_a_field_longer_than_the_csv_module_limit_and_leaves_the_limit_as_it_was(tmp_path):
    import csv

    long_document = "长" * 200_000  # csv's default field limit is 131,072 characters
    path = write(tmp_path / "long.csv", f'id,text\n1,"{long_document}"\n2,short\n')
    previous = csv.field_size_limit(131_072)  # the default, whatever an earlier test left
    try:
        assert load(path) == [long_document, "short"]
        assert csv.field_size_limit() == 131_072
    finally:
        csv.field_size_limit(previous)


def test_corrupt_parquet_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 64)
    with pytest.raises(LlmkitError, match=r"^\S*broken\.parquet: not a readable Parquet file \(.+\)$") as error:
        load(path)
    assert "\n" not in str(error.value)


def test_missing_column_suggests_the_closest_and_lists_the_columns(tmp_path):
    path = write(tmp_path / "c.csv", "id,txet\n1,hello\n")
    with pytest.raises(LlmkitError, match=r"c\.csv: no column 'text' \(did you mean 'txet'\?\) \(columns: \['id', 'txet'\]\)"):
        load(path)


def test_jsonl_row_without_the_field_suggests_the_closest_and_lists_the_fields(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"text": "a"}\n{"txt": "b", "id": 2}\n')
    with pytest.raises(LlmkitError, match=r"rows\.jsonl:2: expected a 'text' field \(did you mean 'txt'\?\) "
                                          r"\(fields: \['txt', 'id'\]\)"):
        load(path)


def test_jsonl_null_field_is_named(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"text": null}\n')
    with pytest.raises(LlmkitError, match=r"rows\.jsonl:1: expected a 'text' field, found it empty"):
        load(path)


def test_local_looking_source_that_is_not_there_is_not_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for source in ("data/missing", "./missing", "a/b/c"):
        with pytest.raises(LlmkitError, match=rf"^data source not found: {source} \(no such file or folder\)$"):
            load(source)


def test_hub_dataset_keeps_the_columns_asked_for_or_all_when_none_are(tmp_path, monkeypatch):
    """Text sources read one column of a wide data set; fine-tuning chat data asks for none and needs them all."""
    import datasets

    hub = datasets.Dataset.from_list([{"text": "文本", "label": "a", "id": 1}])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: hub)
    monkeypatch.chdir(tmp_path)
    assert load_rows("someone/data", ["text"]) == [{"text": "文本"}]
    assert load_rows("someone/data", []) == [{"text": "文本", "label": "a", "id": 1}]


def test_misspelled_built_in_source_suggests_the_closest():
    with pytest.raises(LlmkitError, match=r"data source not found: peoples-daly \(did you mean 'peoples-daily'\?\)"):
        load("peoples-daly")


# Arrow copies of files, and streaming (data.streaming)


def stream(path, **settings):
    return load_text_splits(DataSettings(source=str(path), streaming=True, **settings))


def test_file_corpus_splits_and_packs_as_lists_of_its_lines_do(tokenizer, tmp_path):
    """Read through Arrow, a file gives the documents, split, fingerprint and blocks of its lines as a list."""
    lines = DOCS * 7
    path = write(tmp_path / "c.txt", "\n".join(lines) + "\n")
    splits = load_text_splits(DataSettings(source=str(path), validation_fraction=0.2))
    train, validation = split_documents(lines, 0.2)
    assert documents(splits) == (train, validation)
    assert splits.fingerprint == fingerprint(lines) and splits.validation_chars == count_chars(validation)
    from_arrow, n_tokens = pack_blocks(splits.train, tokenizer, 8, tmp_path / "arrow")
    from_list, n_list_tokens = pack_blocks(train, tokenizer, 8, tmp_path / "list")
    assert from_arrow["input_ids"] == from_list["input_ids"] and n_tokens == n_list_tokens


def test_a_file_is_copied_into_arrow_once_and_again_when_it_changes(tmp_path):
    path = write(tmp_path / "c.txt", "one\ntwo\n")
    first = document_dataset(str(path), DataSettings(source=str(path)))
    again = document_dataset(str(path), DataSettings(source=str(path)))
    assert again.cache_files == first.cache_files and str(tmp_path.parent) in first.cache_files[0]["filename"]
    write(path, "one\ntwo\nthree\n")
    assert load(path) == ["one", "two", "three"]


def test_streamed_splits_hold_out_the_first_documents(tmp_path):
    path = write(tmp_path / "c.txt", "\n".join(DOCS) + "\n\n")
    splits = stream(path, validation_documents=3)
    assert splits.streamed and documents(splits) == (DOCS[3:], DOCS[:3])
    assert list(texts(stream(path, validation_documents=3, max_documents=5).train)) == DOCS[3:5]
    with pytest.raises(LlmkitError, match="too little text"):
        stream(path, validation_documents=len(DOCS))


def test_streamed_blocks_are_the_packed_blocks(tokenizer, tmp_path):
    from llmkit.data import stream_blocks

    lines = [doc for i in range(150) for doc in DOCS[i % 7:]]  # more than one packing batch of documents
    path = write(tmp_path / "c.jsonl", "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in lines))
    splits = stream(path, validation_documents=5)
    streamed = [row["input_ids"] for row in stream_blocks(splits.train, tokenizer, 8)]
    packed, _ = pack_blocks(lines[5:], tokenizer, 8)
    assert len(lines) > 2000 and streamed == packed["input_ids"]


def test_streaming_reads_no_further_than_it_is_asked(tmp_path):
    """A broken last line stops the whole corpus from being read ahead, not a stream that never gets there."""
    path = write(tmp_path / "c.jsonl", "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in DOCS)
                 + "{broken\n")
    with pytest.raises(LlmkitError, match=rf"c\.jsonl:{len(DOCS) + 1}: not a JSON object"):
        load_text_splits(DataSettings(source=str(path)))
    splits = stream(path, validation_documents=2)
    assert [row["text"] for row in islice(splits.train, 5)] == DOCS[2:7]
    with pytest.raises(LlmkitError, match=rf"c\.jsonl:{len(DOCS) + 1}: not a JSON object"):
        list(texts(splits.train))  # read to the end, it is refused as a whole read is


def test_streamed_fingerprint_follows_the_files_without_reading_them(tmp_path):
    path = write(tmp_path / "c.txt", "\n".join(DOCS))
    first = stream(path, validation_documents=2).fingerprint
    assert stream(path, validation_documents=2).fingerprint == first
    assert stream(path, validation_documents=3).fingerprint != first
    write(path, "\n".join(DOCS[::-1]))
    assert stream(path, validation_documents=2).fingerprint != first


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_corpus_reads_its_text_column_without_blank_rows(tmp_path, monkeypatch, streaming):
    import datasets

    hub = datasets.Dataset.from_list([{"body": doc, "id": i} for i, doc in enumerate(["甲", " ", *DOCS])])

    def load_dataset(name, config, split, streaming):
        assert (name, config, split) == ("someone/corpus", None, "train")
        return hub.to_iterable_dataset() if streaming else hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    splits = load_text_splits(DataSettings(source="someone/corpus", text_column="body", streaming=streaming,
                                           validation_documents=1))
    train, validation = documents(splits)
    assert train + validation == ["甲", *DOCS] if not streaming else (validation, train) == (["甲"], DOCS)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this test's one core
@pytest.mark.parametrize("hub", [False, True])
def test_a_stream_read_by_dataloader_workers_holds_out_the_same_documents(tmp_path, monkeypatch, hub):
    """train.dataloader_workers: a stream split among worker processes (datasets shards it by file) would skip
    the held-out documents in each worker's share, training on some of them: a stream is one shard."""
    import datasets
    from torch.utils.data import DataLoader

    for part in range(4):
        write(tmp_path / f"{part}.txt", "\n".join(f"{part}: {doc}" for doc in DOCS))
    every = [f"{part}: {doc}" for part in range(4) for doc in DOCS]
    if hub:
        files = datasets.Dataset.from_dict({"text": every}).to_iterable_dataset(num_shards=4)
        monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming: files)
        monkeypatch.chdir(tmp_path)
    splits = stream("someone/corpus" if hub else tmp_path, validation_documents=5, max_documents=70)
    read = [row["text"] for row in DataLoader(splits.train, num_workers=2, batch_size=None)]
    assert list(texts(splits.validation)) == every[:5] and read == every[5:70]
