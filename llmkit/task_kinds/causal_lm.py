"""Instruction tuning of a causal LM: conversations ({"messages": [...]}, or prompt/response rows) under
the tokenizer's chat template, with the loss on the assistant's tokens only. A fine-tuned model is
scored by generation: its greedy answers against the references (BLEU, chrF, ROUGE-L)."""

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


def prepare_row(row: dict, settings, where: str) -> dict:
    """A row as {"messages": [...]}: chat rows as they are, prompt/response rows as one turn."""
    messages = row.get(settings.messages_column)
    if messages is None:
        prompt, response = row.get(settings.prompt_column), row.get(settings.response_column)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise LlmkitError(f"{where}: expected text fields '{settings.prompt_column}' and "
                              f"'{settings.response_column}', or a '{settings.messages_column}' list")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and m.get("role") for m in messages):
        raise LlmkitError(f"{where}: '{settings.messages_column}' must be a list of {{role, content}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise LlmkitError(f"{where}: no assistant message to learn")
    return {"messages": messages}


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
