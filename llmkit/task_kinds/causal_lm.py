"""Instruction tuning of a causal LM: conversations under the tokenizer's chat template, with the loss on
the assistant's tokens only. Rows come in the layouts SFT data sets use (OpenAI/HF chat `messages`,
ShareGPT `conversations`, Alpaca `instruction`/`input`/`output`, prompt/response) and all become
{"messages": [...]}. A fine-tuned model is scored by generation: its greedy answers against the
references (BLEU, chrF, ROUGE-L)."""

from __future__ import annotations

from llmkit.errors import LlmkitError
from llmkit.settings import EvalTask
from llmkit.task_kinds.common import IGNORE, Features, token_labels_collator

# A chat template for tokenizers without one (those llmkit trains): question, answer, end of answer.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}答：{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'user' %}问：{{ message['content'] }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}答：{% endif %}"
)


# Other names of the speakers (ShareGPT's human and gpt, Gemini's model) -> the roles chat templates know;
# user, assistant, system and any other role pass as they are.
ROLES = {"human": "user", "gpt": "assistant", "model": "assistant"}


def prepare_row(row: dict, settings, where: str) -> dict:
    """A row as {"messages": [...]}, whatever layout it comes in (finetune.format, or on "auto" the first
    that its fields fit), so that templating, loss and scoring handle one shape. A "system" field opens the
    conversation unless it opens with a system message already."""
    layout = settings.format if settings.format != "auto" else detect_format(row, settings, where)
    if any(row.get(name) is None for name in format_fields(settings)[layout]):
        raise LlmkitError(f'{where}: finetune.format "{layout}" expects {fields_of(layout, settings)}, '
                          f"found fields {list(row)}")
    messages = CONVERTERS[layout](row, settings, where)
    system = optional_text(row, "system", where)
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    if not any(m["role"] == "assistant" for m in messages):
        raise LlmkitError(f"{where}: no assistant message to learn")
    return {"messages": messages}


def format_fields(settings) -> dict[str, tuple[str, ...]]:
    """The fields each layout needs, in the order "auto" tries them; the recipe names the columns of chat
    and prompt/response rows, ShareGPT and Alpaca keep their fixed names."""
    return {"messages": (settings.messages_column,), "sharegpt": ("conversations",),
            "alpaca": ("instruction", "output"),
            "prompt-response": (settings.prompt_column, settings.response_column)}


def fields_of(layout: str, settings) -> str:
    """A layout's fields as errors name them: 'instruction' + 'output'."""
    return " + ".join(f"'{name}'" for name in format_fields(settings)[layout])


def detect_format(row: dict, settings, where: str) -> str:
    """The first layout whose fields the row has (a hub data set's missing field reads as None)."""
    for layout, names in format_fields(settings).items():
        if all(row.get(name) is not None for name in names):
            return layout
    expected = ", ".join(f"{fields_of(layout, settings)} ({layout})" for layout in format_fields(settings))
    raise LlmkitError(f"{where}: no SFT format fits the fields {list(row)} (expected {expected}; "
                      f"or set finetune.format)")


def from_messages(row: dict, settings, where: str) -> list[dict]:
    return conversation(row[settings.messages_column], settings.messages_column, where)


def from_sharegpt(row: dict, settings, where: str) -> list[dict]:
    return conversation(row["conversations"], "conversations", where)


def conversation(turns: object, field: str, where: str) -> list[dict]:
    """Turns as {role, content} messages: OpenAI's {role, content} and ShareGPT's {from, value} alike, since
    data sets mix the two conventions under either column name."""
    messages = []
    for turn in turns if isinstance(turns, list) else [None]:  # not a list: refused below, with the same message
        turn = turn if isinstance(turn, dict) else {}
        role, content = first_present(turn, ("role", "from")), first_present(turn, ("content", "value"))
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise LlmkitError(f"{where}: '{field}' must be a list of {{role, content}} (or {{from, value}}) objects")
        messages.append({"role": ROLES.get(role, role), "content": content})
    return messages


def first_present(turn: dict, keys: tuple[str, ...]) -> object:
    """The value of the first key that is there and not None (a hub data set fills absent keys with None)."""
    return next((turn[key] for key in keys if turn.get(key) is not None), None)


def from_alpaca(row: dict, settings, where: str) -> list[dict]:
    """Alpaca's instruction (with its input on the next line) and output, after LLaMA-Factory's "history"
    of earlier [user, assistant] pairs."""
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(pair, (list, tuple)) and len(pair) == 2
                                                and all(isinstance(text, str) for text in pair) for pair in history):
        raise LlmkitError(f"{where}: 'history' must be a list of [user, assistant] text pairs")
    earlier = [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]
    extra = optional_text(row, "input", where)
    prompt = required_text(row, "instruction", where) + ("\n" + extra if extra else "")
    return [*earlier, {"role": "user", "content": prompt},
            {"role": "assistant", "content": required_text(row, "output", where)}]


def from_prompt_response(row: dict, settings, where: str) -> list[dict]:
    return [{"role": "user", "content": required_text(row, settings.prompt_column, where)},
            {"role": "assistant", "content": required_text(row, settings.response_column, where)}]


CONVERTERS = {"messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_alpaca,
              "prompt-response": from_prompt_response}


def required_text(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise LlmkitError(f"{where}: expected the '{name}' field to be text, got {type(value).__name__}")
    return value


def optional_text(row: dict, name: str, where: str) -> str:
    """A field that may be absent, None or empty (all alike: ""), else text."""
    return required_text(row, name, where) if row.get(name) is not None else ""


def prepare_tokenizer(tokenizer, settings) -> None:
    """The recipe's chat template, or llmkit's plain one for a tokenizer that has none."""
    if settings.chat_template or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = settings.chat_template or PLAIN_CHAT_TEMPLATE


def training_texts(settings, rows: list[dict]) -> list[str]:
    return [message["content"] for row in rows for message in row["messages"]]


def encode(settings, tokenizer, rows: list[dict], label2id: dict[str, int]) -> Features:
    """The chat template over each conversation; loss only on the assistant's tokens."""
    features, truncated = [], 0
    for row in rows:
        messages = row["messages"]
        ids = render(tokenizer, messages)
        labels = [IGNORE] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] == "assistant":
                begin = len(render(tokenizer, messages[:turn], generation_prompt=True))
                end = len(render(tokenizer, messages[:turn + 1]))
                labels[begin:end] = ids[begin:end]
        truncated += len(ids) > settings.max_length
        ids, labels = ids[:settings.max_length], labels[:settings.max_length]
        if any(label != IGNORE for label in labels):
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Features(features, truncated, len(rows) - len(features))


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation; the tokenizer adds its special tokens unless the template did."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=not starts_with_bos(tokenizer, text))["input_ids"]


def starts_with_bos(tokenizer, text: str) -> bool:
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


def collator(tokenizer, virtual_tokens: int = 0):
    """Pads labels with IGNORE; PEFT itself puts the virtual tokens' labels of a causal LM in place."""
    return token_labels_collator(tokenizer)


def scoring_rows(settings, tokenizer, rows: list[dict]) -> tuple[EvalTask, list[dict]]:
    """Test rows as `llmkit eval` generation rows: the templated prompt up to the last assistant turn,
    and that turn as the reference."""
    task = EvalTask(kind="generation", source=settings.test_source, split="all", prompt_column="prompt",
                    reference_column="reference")
    scored = []
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        if starts_with_bos(tokenizer, prompt):  # generation adds the tokenizer's special tokens itself
            prompt = prompt[len(tokenizer.bos_token):]
        scored.append({"prompt": prompt, "reference": messages[last]["content"]})
    return task, scored
