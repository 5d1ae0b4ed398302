"""Fine-tuning data without a model: hold-out, label names, row checks, features on a character
tokenizer, and the prompt-tuning collator. Covers llmkit/task_data.py, llmkit/splits.py (hold-out) and the
row checks, encoders and collators of llmkit/task_kinds/classification.py, llmkit/task_kinds/token_classification.py,
llmkit/task_kinds/extractive_qa.py and llmkit/task_kinds/causal_lm.py (their scorers: tests/test_evaluate.py), with
the SFT formats causal-lm reads from files and from a hub data set (datasets.load_dataset replaced)."""

import json

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.settings import FinetuneSettings
from llmkit.splits import hold_out
from llmkit.task_data import TaskData, collator, encode, label_names, load_task_data, read_rows
from llmkit.task_kinds import causal_lm, extractive_qa
from llmkit.task_kinds.causal_lm import PLAIN_CHAT_TEMPLATE
from llmkit.task_kinds.common import IGNORE
from tests.conftest import char_tokenizer

chat_messages = causal_lm.prepare_row


def answer_span(row: dict, settings, where: str) -> dict:
    """The answer as the QA module puts it in its row."""
    return extractive_qa.prepare_row(dict(row), settings, where)[settings.answers_column]


@pytest.fixture(scope="module")
def tokenizer():
    """The character tokenizer as llmkit.finetune.task_tokenizer prepares it (a base without a chat template)."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- splits and labels


def test_hold_out_is_seeded_disjoint_and_complete():
    rows = [{"n": n} for n in range(50)]
    train, validation = hold_out(rows, 0.2, seed=1)
    assert (train, validation) == hold_out(rows, 0.2, seed=1)
    assert validation != hold_out(rows, 0.2, seed=2)[1]
    assert len(validation) == 10
    assert sorted(r["n"] for r in train + validation) == list(range(50))  # disjoint, nothing lost
    assert [r["n"] for r in train] == sorted(r["n"] for r in train)  # both keep the file's order
    assert [r["n"] for r in validation] == sorted(r["n"] for r in validation)


def test_load_task_data_holds_out_validation_unless_given(tmp_path):
    rows = [{"text": f"文本{n}", "label": "a" if n % 2 else "b"} for n in range(20)]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    held = load_task_data(FinetuneSettings(source=source, validation_fraction=0.25), seed=0)
    assert (len(held.train), len(held.validation), held.test) == (15, 5, [])
    given = load_task_data(FinetuneSettings(source=source, validation_source=source), seed=0)
    assert (len(given.train), len(given.validation)) == (20, 20)


def test_labels_are_sorted_with_o_first_for_tags_and_integers_sorted_as_numbers():
    def names(task, rows, **settings):
        column = "label" if task == "classification" else "tags"
        return label_names(FinetuneSettings(task=task, **settings),
                           TaskData([{column: value} for value in rows], [], []))

    assert names("classification", ["pos", "neg", "pos"]) == ["neg", "pos"]
    assert names("classification", [10, 9, 2]) == ["2", "9", "10"]
    assert names("token-classification", [["B-LOC", "O"], ["I-LOC", "B-PER"]]) == ["O", "B-LOC", "B-PER", "I-LOC"]
    assert names("classification", ["pos", "neg"], labels=["pos", "neg", "mixed"]) == ["pos", "neg", "mixed"]


def test_labels_outside_the_recipe_list_are_refused():
    data = TaskData([{"label": "pos"}, {"label": "neg"}], [{"label": "mixed"}], [])
    with pytest.raises(LlmkitError, match="label 'neg' is not in finetune.labels"):
        label_names(FinetuneSettings(labels=["pos", "mixed"]), data)
    with pytest.raises(LlmkitError, match=r"\(validation split\): label 'mixed' never appears in the training data"):
        label_names(FinetuneSettings(), data)


def test_classification_needs_two_labels():
    with pytest.raises(LlmkitError, match="needs at least 2 labels"):
        label_names(FinetuneSettings(), TaskData([{"label": "pos"}] * 3, [{"label": "pos"}], []))


def test_tagging_rows_need_one_tag_per_token(tmp_path):
    source = write_jsonl(tmp_path / "tags.jsonl", [{"tokens": list("北京"), "tags": ["B-LOC", "I-LOC"]},
                                                   {"tokens": "首都", "tags": ["O"]}])
    with pytest.raises(LlmkitError, match=r"tags.jsonl: row 2: expected a list 'tags' with one tag per token of "
                                          r"'tokens' \(2 tokens, 1 tags\)"):
        load_task_data(FinetuneSettings(task="token-classification", source=source), seed=0)


def test_qa_answer_start_is_found_when_absent_and_checked_when_given():
    settings = FinetuneSettings(task="extractive-qa")
    row = {"context": "北京是中国的首都", "answers": {"text": ["首都"]}}
    assert answer_span(row, settings, "row 1") == {"text": ["首都"], "answer_start": [6]}
    row = {"context": "北京是中国的首都", "answers": {"text": ["首都"], "answer_start": [5]}}
    with pytest.raises(LlmkitError, match="row 1: the answer '首都' is not in its context at answer_start 5"):
        answer_span(row, settings, "row 1")


def test_chat_row_without_an_assistant_turn_is_refused():
    settings = FinetuneSettings(task="causal-lm")
    with pytest.raises(LlmkitError, match="row 3: no assistant message to learn"):
        chat_messages({"messages": [{"role": "user", "content": "你好"}]}, settings, "row 3")
    with pytest.raises(LlmkitError, match=r"row 4: no SFT format fits the fields \['prompt'\]"):
        chat_messages({"prompt": "你好"}, settings, "row 4")


# ---------------------------------------------------------------- SFT formats (causal-lm rows)

HELLO = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"}]


def sft_rows(tmp_path, rows: list[dict], **settings) -> list[dict]:
    """Rows of a JSONL file as fine-tuning reads them (llmkit.task_data.read_rows): {"messages": [...]} each."""
    settings = FinetuneSettings(task="causal-lm", **settings)
    return read_rows(settings, write_jsonl(tmp_path / "sft.jsonl", rows), "train")


def plain_chat(tokenizer, *parts: str) -> tuple[list[int], list[int]]:
    """input_ids and labels under the plain template: <s>, then parts alternating between text without loss
    and an answer that is learned with its </s>."""
    input_ids, labels = [tokenizer.bos_token_id], [IGNORE]
    for number, part in enumerate(parts):
        learned = number % 2 == 1
        tokens = ids(tokenizer, part) + ([tokenizer.eos_token_id] if learned else [])
        input_ids += tokens
        labels += tokens if learned else [IGNORE] * len(tokens)
    return input_ids, labels


def features_of(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    settings = FinetuneSettings(task="causal-lm", max_length=64)
    return [(feature["input_ids"], feature["labels"]) for feature in encode(settings, tokenizer, rows, []).rows]


def test_alpaca_rows_put_input_under_the_instruction_and_history_and_system_first(tmp_path, tokenizer):
    rows = sft_rows(tmp_path, [
        {"instruction": "天气", "input": "今天", "output": "很好"},
        {"instruction": "你好", "input": "", "output": "您好", "system": "礼貌", "history": [["早", "早上好"]]}])
    assert rows == [
        {"messages": [{"role": "user", "content": "天气\n今天"}, {"role": "assistant", "content": "很好"}]},
        {"messages": [{"role": "system", "content": "礼貌"}, {"role": "user", "content": "早"},
                      {"role": "assistant", "content": "早上好"}, *HELLO]}]
    assert features_of(tokenizer, rows) == [plain_chat(tokenizer, "问：天气\n今天答：", "很好"),
                                            plain_chat(tokenizer, "礼貌问：早答：", "早上好", "问：你好答：", "您好")]


def test_sharegpt_rows_map_human_and_gpt_to_user_and_assistant(tmp_path, tokenizer):
    rows = sft_rows(tmp_path, [
        {"conversations": [{"from": "system", "value": "礼貌"}, {"from": "human", "value": "你好"},
                           {"from": "gpt", "value": "您好"}, {"from": "user", "value": "再见"},
                           {"from": "assistant", "value": "再会"}]},
        {"system": "礼貌", "conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "您好"}]}])
    assert rows == [
        {"messages": [{"role": "system", "content": "礼貌"}, *HELLO, {"role": "user", "content": "再见"},
                      {"role": "assistant", "content": "再会"}]},
        {"messages": [{"role": "system", "content": "礼貌"}, *HELLO]}]
    assert features_of(tokenizer, rows) == [plain_chat(tokenizer, "礼貌问：你好答：", "您好", "问：再见答：", "再会"),
                                            plain_chat(tokenizer, "礼貌问：你好答：", "您好")]


def test_chat_messages_are_read_from_the_recipe_column(tmp_path, tokenizer):
    rows = sft_rows(tmp_path, [{"chat": [{"role": "user", "content": "你好"}, {"role": "model", "content": "您好"}]}],
                    messages_column="chat")
    assert rows == [{"messages": HELLO}]  # Gemini's "model" is the assistant
    assert features_of(tokenizer, rows) == [plain_chat(tokenizer, "问：你好答：", "您好")]


def test_prompt_response_rows_are_read_from_the_recipe_columns(tmp_path, tokenizer):
    rows = sft_rows(tmp_path, [{"question": "你好", "answer": "您好"}], prompt_column="question",
                    response_column="answer")
    assert rows == [{"messages": HELLO}]
    assert features_of(tokenizer, rows) == [plain_chat(tokenizer, "问：你好答：", "您好")]


def test_auto_detects_the_format_of_each_row_in_order_and_a_named_format_overrides_it(tmp_path):
    formats = [{"messages": HELLO},
               {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "您好"}]},
               {"instruction": "你好", "output": "您好"},
               {"prompt": "你好", "response": "您好"}]
    assert sft_rows(tmp_path, formats) == [{"messages": HELLO}] * 4
    both = {"messages": HELLO, "instruction": "再见", "output": "再会"}  # messages come first
    assert sft_rows(tmp_path, [both]) == [{"messages": HELLO}]
    assert sft_rows(tmp_path, [both], format="alpaca") == [
        {"messages": [{"role": "user", "content": "再见"}, {"role": "assistant", "content": "再会"}]}]


def test_a_row_no_format_fits_is_refused_in_one_line_naming_the_expected_fields(tmp_path):
    rows = [{"prompt": "你好", "response": "您好"}, {"instruction": "你好", "response": "您好"}]
    with pytest.raises(LlmkitError) as refused:
        sft_rows(tmp_path, rows)
    assert str(refused.value) == (
        f"{tmp_path / 'sft.jsonl'}: row 2: no SFT format fits the fields ['instruction', 'response'] (expected "
        "'messages' (messages), 'conversations' (sharegpt), 'instruction' + 'output' (alpaca), "
        "'prompt' + 'response' (prompt-response); or set finetune.format)")
    with pytest.raises(LlmkitError, match=r"row 1: finetune.format \"sharegpt\" expects 'conversations', "
                                          r"found fields \['prompt', 'response'\]$"):
        sft_rows(tmp_path, rows, format="sharegpt")
    with pytest.raises(LlmkitError, match=r"row 1: 'conversations' must be a list of \{role, content\}"):
        sft_rows(tmp_path, [{"conversations": [{"from": "human", "text": "你好"}]}])
    with pytest.raises(LlmkitError, match=r"row 1: 'history' must be a list of \[user, assistant\] text pairs"):
        sft_rows(tmp_path, [{"instruction": "你好", "output": "您好", "history": [["早"]]}])
    with pytest.raises(LlmkitError, match='finetune.format "alpaca" is for task "causal-lm", not "classification"'):
        FinetuneSettings(format="alpaca").check()


def test_hub_sft_rows_keep_every_column(tmp_path, monkeypatch):
    """A hub data set read for causal-lm asks for no columns and keeps them all; a field absent from a row
    comes as None there, as if it were not given."""
    import datasets

    hub = datasets.Dataset.from_list([
        {"instruction": "天气", "input": "今天", "output": "很好", "system": None, "history": None},
        {"instruction": "你好", "input": None, "output": "您好", "system": "礼貌", "history": [["早", "早上好"]]}])
    asked = []

    def load_dataset(name, config, split):
        asked.append((name, split))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    rows = read_rows(FinetuneSettings(task="causal-lm"), "someone/alpaca-zh", "train")
    assert asked == [("someone/alpaca-zh", "train")]
    assert rows == [
        {"messages": [{"role": "user", "content": "天气\n今天"}, {"role": "assistant", "content": "很好"}]},
        {"messages": [{"role": "system", "content": "礼貌"}, {"role": "user", "content": "早"},
                      {"role": "assistant", "content": "早上好"}, *HELLO]}]


# ---------------------------------------------------------------- features


def test_prompt_response_row_learns_only_the_response(tokenizer):
    settings = FinetuneSettings(task="causal-lm", max_length=64)
    row = chat_messages({"prompt": "今天天气", "response": "很好"}, settings, "row 1")
    features = encode(settings, tokenizer, [row], [])
    (feature,) = features.rows
    # <s>问：今天天气答： carries no loss; 很好</s> is learned, the labels equal to the ids (the model shifts).
    prompt = [tokenizer.bos_token_id] + ids(tokenizer, "问：今天天气答：")
    response = ids(tokenizer, "很好") + [tokenizer.eos_token_id]
    assert feature["input_ids"] == prompt + response
    assert feature["labels"] == [IGNORE] * len(prompt) + response
    assert (features.truncated, features.dropped) == (0, 0)


def test_chat_messages_learn_every_assistant_turn_and_nothing_else(tokenizer):
    settings = FinetuneSettings(task="causal-lm", max_length=64)
    messages = [{"role": "system", "content": "礼貌"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "您好"}, {"role": "user", "content": "再见"},
                {"role": "assistant", "content": "再会"}]
    (feature,) = encode(settings, tokenizer, [{"messages": messages}], []).rows
    text = [tokenizer.bos_token_id] + ids(tokenizer, "礼貌问：你好答：")
    first = ids(tokenizer, "您好") + [tokenizer.eos_token_id]
    middle = ids(tokenizer, "问：再见答：")
    second = ids(tokenizer, "再会") + [tokenizer.eos_token_id]
    assert feature["input_ids"] == text + first + middle + second
    assert feature["labels"] == [IGNORE] * len(text) + first + [IGNORE] * len(middle) + second


def test_chat_truncation_is_counted_and_a_row_with_no_response_left_is_dropped(tokenizer):
    settings = FinetuneSettings(task="causal-lm", max_length=8)
    rows = [{"messages": [{"role": "user", "content": "天气"}, {"role": "assistant", "content": "很好"}]},
            {"messages": [{"role": "user", "content": "今天天气怎么样"}, {"role": "assistant", "content": "好"}]}]
    features = encode(settings, tokenizer, rows, [])
    assert (features.truncated, features.dropped, len(features.rows)) == (2, 1, 1)
    # <s>问：天气答：很 | 好</s>: the first response token is kept, so the row is.
    assert features.rows[0]["labels"] == [IGNORE] * 7 + ids(tokenizer, "很")


def test_text_pair_is_encoded_after_the_text_and_counted_when_truncated(tokenizer):
    settings = FinetuneSettings(task="classification", text_pair_column="pair", max_length=64)
    rows = [{"text": "今天", "pair": "很好", "label": "good"}]
    features = encode(settings, tokenizer, rows, ["bad", "good"])
    # The character tokenizer's pair template: <s> text pair.
    assert features.rows == [{"input_ids": [tokenizer.bos_token_id] + ids(tokenizer, "今天") + ids(tokenizer, "很好"),
                              "attention_mask": [1] * 5, "labels": 1}]
    assert features.truncated == 0
    settings.max_length = 4  # the pair makes the row 5 tokens long
    assert encode(settings, tokenizer, rows, ["bad", "good"]).truncated == 1


def test_encode_tagging_puts_each_tag_on_the_first_sub_token(tokenizer):
    settings = FinetuneSettings(task="token-classification", max_length=64)
    label2id = ["O", "B-LOC", "I-LOC"]
    row = {"tokens": ["北京", "是", "中国", "的", "首都"], "tags": ["B-LOC", "O", "B-LOC", "O", "O"]}
    features = encode(settings, tokenizer, [row], label2id)
    (feature,) = features.rows
    # <s> 北 京 是 中 国 的 首 都: the character tokenizer splits two-character words in two.
    assert len(feature["input_ids"]) == 9
    assert feature["labels"] == [IGNORE, 1, IGNORE, 0, 1, IGNORE, 0, 0, IGNORE]
    assert features.truncated == 0


def test_tagging_truncation_counts_rows_that_lose_words(tokenizer):
    settings = FinetuneSettings(task="token-classification", max_length=4)
    rows = [{"tokens": list("北京"), "tags": ["O", "O"]}, {"tokens": list("北京是中国的首都"), "tags": ["O"] * 8}]
    features = encode(settings, tokenizer, rows, ["O"])
    assert features.truncated == 1
    assert [len(f["labels"]) for f in features.rows] == [3, 4]


def test_encode_qa_start_and_end_tokens_cover_the_answer(tokenizer):
    settings = FinetuneSettings(task="extractive-qa", max_length=64)
    context = "北京是中国的首都"
    rows = [{"question": "哪里？", "context": context,
             "answers": {"text": [answer], "answer_start": [context.find(answer)]}}
            for answer in ("北京", "中国", "首都")]
    features = encode(settings, tokenizer, rows, [])
    encoded = tokenizer(["哪里？"], [context], return_offsets_mapping=True)
    offsets = encoded["offset_mapping"][0]
    spans = [context[offsets[f["start_positions"]][0]:offsets[f["end_positions"]][1]] for f in features.rows]
    assert spans == ["北京", "中国", "首都"]
    assert all(encoded.sequence_ids(0)[f["start_positions"]] == 1 for f in features.rows)  # in the context


def test_encode_qa_drops_an_answer_cut_off_by_truncation(tokenizer):
    settings = FinetuneSettings(task="extractive-qa", max_length=8)
    context = "北京是中国的首都"  # <s> + 3 question tokens leave room for 4 context characters
    rows = [{"question": "哪里？", "context": context,
             "answers": {"text": [answer], "answer_start": [context.find(answer)]}}
            for answer in ("北京", "首都")]
    features = encode(settings, tokenizer, rows, [])
    assert (features.truncated, features.dropped, len(features.rows)) == (2, 1, 1)
    assert features.rows[0]["start_positions"] == 4


def test_prompt_tuning_collator_moves_tagger_and_qa_targets_right(tokenizer):
    tags = [{"input_ids": [0, 5, 6], "attention_mask": [1, 1, 1], "labels": [IGNORE, 1, 0]},
            {"input_ids": [0, 7], "attention_mask": [1, 1], "labels": [IGNORE, 2]}]
    plain = collator("token-classification", tokenizer)(tags)
    shifted = collator("token-classification", tokenizer, virtual_tokens=4)(tags)
    assert plain["labels"].tolist() == [[IGNORE, 1, 0], [IGNORE, 2, IGNORE]]
    assert shifted["labels"].tolist() == [[IGNORE] * 4 + row for row in plain["labels"].tolist()]
    assert torch.equal(shifted["input_ids"], plain["input_ids"])  # PEFT adds the virtual tokens itself

    spans = [{"input_ids": [0, 5, 6], "attention_mask": [1, 1, 1], "start_positions": 1, "end_positions": 2}]
    shifted = collator("extractive-qa", tokenizer, virtual_tokens=4)(spans)
    assert (shifted["start_positions"].tolist(), shifted["end_positions"].tolist()) == ([5], [6])


def test_causal_lm_and_classification_targets_do_not_move_with_prompt_tuning(tokenizer):
    chat = [{"input_ids": [0, 5, 6], "attention_mask": [1, 1, 1], "labels": [IGNORE, 5, 6]}]
    assert collator("causal-lm", tokenizer, virtual_tokens=4)(chat)["labels"].tolist() == [[IGNORE, 5, 6]]
    classes = [{"input_ids": [0, 5], "attention_mask": [1, 1], "labels": 1}]
    assert collator("classification", tokenizer, virtual_tokens=4)(classes)["labels"].tolist() == [1]
