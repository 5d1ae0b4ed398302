import pytest

from llmkit.data import load_text_splits, texts
from llmkit.errors import LlmkitError
from llmkit.settings import DataSettings, TokenizerSettings
from llmkit.tokenizer import load_tokenizer, train_tokenizer

TEXT = "昨天天气很好，我们去了公园。"


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return list(texts(load_text_splits(DataSettings(max_documents=300)).train))


@pytest.fixture(scope="module")
def char(documents):
    return train_tokenizer(documents, TokenizerSettings(kind="char", vocab_size=2000), "causal")


@pytest.fixture(scope="module")
def bpe(documents):
    return train_tokenizer(documents, TokenizerSettings(kind="bpe", vocab_size=400), "causal")


def test_char_tokenizer_has_one_token_per_character(char):
    tokens = char.convert_ids_to_tokens(char(TEXT, add_special_tokens=False)["input_ids"])
    assert tokens == list(TEXT)


def test_prompt_encoding_starts_with_bos_and_has_no_eos(char):
    ids = char(TEXT)["input_ids"]
    assert ids[0] == char.bos_token_id and char.bos_token == "<s>"
    assert char.eos_token_id not in ids and len(ids) == len(TEXT) + 1


def test_char_decode_round_trips_chinese_text(char):
    assert char.decode(char(TEXT)["input_ids"], skip_special_tokens=True) == TEXT


def test_unseen_characters_become_unk(char):
    ids = char("天☃气", add_special_tokens=False)["input_ids"]
    assert ids[1] == char.unk_token_id and char.unk_token == "<unk>"
    assert ids[0] != char.unk_token_id and ids[2] != char.unk_token_id


def test_saved_tokenizer_reloads_with_auto_tokenizer(char, tmp_path):
    from transformers import AutoTokenizer

    char.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(TEXT)["input_ids"] == char(TEXT)["input_ids"]
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert len(reloaded) == len(char)


def test_load_tokenizer_reads_a_saved_tokenizer(char, tmp_path):
    char.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))(TEXT)["input_ids"] == char(TEXT)["input_ids"]


def test_char_vocab_too_small_names_the_key_and_the_minimum(documents):
    with pytest.raises(LlmkitError, match=r"tokenizer\.vocab_size = 50 is too small.*use at least (\d+)") as error:
        train_tokenizer(documents, TokenizerSettings(kind="char", vocab_size=50), "causal")
    needed = int(error.value.args[0].rsplit("use at least ", 1)[1].split()[0])
    train_tokenizer(documents, TokenizerSettings(kind="char", vocab_size=needed), "causal")  # enough
    with pytest.raises(LlmkitError):
        train_tokenizer(documents, TokenizerSettings(kind="char", vocab_size=needed - 1), "causal")


def test_bpe_round_trips_text_it_never_saw(bpe):
    text = "Byte-level: wörld ☃ 🙂 新年好"
    ids = bpe(text)["input_ids"]
    assert bpe.unk_token_id not in ids
    assert bpe.decode(ids, skip_special_tokens=True) == text


def test_bpe_learns_merges_within_its_vocab_size(bpe, documents):
    assert 256 < len(bpe) <= 400
    assert len(bpe(documents[0], add_special_tokens=False)["input_ids"]) < len(documents[0].encode())


def test_bpe_vocab_below_the_byte_alphabet_is_refused(documents):
    with pytest.raises(LlmkitError, match=r"tokenizer\.vocab_size = 259 is too small for byte-level BPE.*at least 260"):
        train_tokenizer(documents, TokenizerSettings(kind="bpe", vocab_size=259), "causal")


def test_mlm_tokenizer_wraps_text_in_cls_sep_and_has_a_mask(documents):
    mlm = train_tokenizer(documents, TokenizerSettings(kind="char", vocab_size=2000), "mlm")
    tokens = mlm.convert_ids_to_tokens(mlm("天气")["input_ids"])
    assert tokens == ["[CLS]", "天", "气", "[SEP]"]
    assert mlm.mask_token == "[MASK]" and mlm.mask_token_id is not None and mlm.mask_token_id != mlm.unk_token_id


def test_load_tokenizer_on_a_folder_without_one_is_refused(tmp_path):
    with pytest.raises(LlmkitError, match=f"cannot load a tokenizer from {tmp_path}"):
        load_tokenizer(str(tmp_path))
