"""What a task is, in one table: every kind of job llmkit trains a model for or scores it on.

An entry says which model head the task needs, which columns of the data it reads, what it reports,
how the Trainer and PEFT see it; its module (llmkit/task_kinds/<module>.py) holds what differs in code:
checking rows, turning them into features, scoring predictions. Adding a task kind is one entry here
and its module, plus a recipe and tests; the commands and the data layer read everything from here
(llmkit.task_data finds a task's module by the name its entry gives).

A task module provides `score(model, tokenizer, task, rows, batch_size) -> metrics` (every task that
`llmkit eval` scores) and, for a task that can be fine-tuned, `prepare_row(row, settings, where)`,
`encode(settings, tokenizer, rows, label2id) -> Features`, `collator(tokenizer, virtual_tokens)` and
`training_texts(settings, rows)`; a task with labels also `labels_of(settings, rows)`. Optional hooks
are named where they are used (llmkit.task_data, llmkit.finetune).

Nothing is imported here, so that settings can name the tasks and a recipe loads instantly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Head:
    auto_class: str  # the transformers Auto class that loads a model with this head
    architectures: tuple[str, ...]  # endings of the class names (config.architectures) of models that have it
    pipeline_tag: str  # the hub's name for what such a model does (its widget, its search filter)


HEADS = {
    "causal-lm": Head("AutoModelForCausalLM", ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"),
                      "text-generation"),
    "masked-lm": Head("AutoModelForMaskedLM", ("ForMaskedLM", "ForPreTraining"), "fill-mask"),
    "sequence-classification": Head("AutoModelForSequenceClassification", ("ForSequenceClassification",),
                                    "text-classification"),
    "token-classification": Head("AutoModelForTokenClassification", ("ForTokenClassification",),
                                 "token-classification"),
    "question-answering": Head("AutoModelForQuestionAnswering", ("ForQuestionAnswering",), "question-answering"),
    "seq2seq-lm": Head("AutoModelForSeq2SeqLM", ("ForConditionalGeneration",), "text2text-generation"),
    "image-text-to-text": Head("AutoModelForImageTextToText", ("ForConditionalGeneration",), "image-text-to-text"),
}


@dataclass(frozen=True)
class Task:
    module: str  # llmkit.task_kinds.<module> implements it
    head: str  # a key of HEADS
    columns: tuple[str, ...] = ()  # settings fields (llmkit.settings.Columns) naming the columns it reads
    text_columns: int = 0  # how many of the first columns must hold text
    optional_columns: tuple[str, ...] = ()  # columns read only when their setting is not ""
    headline: tuple[str, ...] = ()  # metrics in the tables of `llmkit eval` and `llmkit quantize`, in order
    select_by: tuple[str, ...] = ()  # validation metrics that can pick the checkpoint kept (the first: default)
    peft_task_type: str = ""  # PEFT's TaskType; "" = scored only, not fine-tuned
    scored_as: str = ""  # the task whose scorer tests a fine-tuned model; "" = its own
    targets: tuple[str, ...] = ("labels",)  # the features the loss is computed against (Trainer's label_names)
    has_labels: bool = False  # a label vocabulary, kept in the model's config (id2label)
    distillable: bool = False  # a teacher's output distribution can be matched token by token or per example
    shares_encoder: bool = False  # its head reads the base model's hidden states: it can join a multi-task model
    group_by_length: bool = True  # training batches of similar lengths (little padding); False: drawn at random, where a
    # batch of one length is one kind of example (scenes of three objects) and would pull the model one way at a time

    @property
    def fine_tunable(self) -> bool:
        return bool(self.peft_task_type)


TASKS = {
    "perplexity": Task("perplexity", "causal-lm", ("text_column",), 1,
                       headline=("loss_per_char", "perplexity", "loss")),
    "generation": Task("generation", "causal-lm", ("prompt_column", "reference_column"), 1,
                       headline=("bleu", "chrf", "rouge_l")),
    "prompt": Task("prompt", "causal-lm", ("text_column", "label_column"), 1, optional_columns=("text_pair_column",),
                   headline=("accuracy", "f1", "majority_accuracy")),  # classification by prompting, no training
    "classification": Task("classification", "sequence-classification", ("text_column", "label_column"), 1,
                           optional_columns=("text_pair_column",), headline=("accuracy", "f1"),
                           select_by=("accuracy", "f1", "precision", "recall"), peft_task_type="SEQ_CLS",
                           has_labels=True, distillable=True, shares_encoder=True),
    "token-classification": Task("token_classification", "token-classification", ("tokens_column", "tags_column"),
                                 headline=("f1", "precision", "recall"), select_by=("f1", "precision", "recall"),
                                 peft_task_type="TOKEN_CLS", has_labels=True, distillable=True, shares_encoder=True),
    "extractive-qa": Task("extractive_qa", "question-answering",
                          ("context_column", "question_column", "answers_column"), 2,
                          headline=("exact_match", "f1"), select_by=("f1", "exact_match"),
                          peft_task_type="QUESTION_ANS", targets=("start_positions", "end_positions"),
                          shares_encoder=True),
    "causal-lm": Task("causal_lm", "causal-lm", peft_task_type="CAUSAL_LM", scored_as="generation",
                      distillable=True),  # instruction tuning; its loss picks the checkpoint
    # an encoder-decoder: prompt_column (source) -> response_column (target), as prompt/response SFT data;
    # scored by greedy generation (exact match, BLEU, chrF); its loss picks the checkpoint
    "seq2seq": Task("seq2seq", "seq2seq-lm", ("prompt_column", "response_column"), 2,
                    headline=("exact_match", "chrf", "bleu"), peft_task_type="SEQ_2_SEQ_LM"),
    # pictures as prompts, with a vision-language model (llmkit.vision): image_column -> its caption
    # (text_column), or image_column + question_column -> answer_column; scored by greedy generation
    "caption": Task("image_text", "image-text-to-text", ("image_column", "text_column"),
                    headline=("attribute_accuracy", "exact_match", "bleu", "chrf"),
                    select_by=("chrf", "attribute_accuracy", "exact_match", "bleu"), peft_task_type="CAUSAL_LM",
                    group_by_length=False),
    "vqa": Task("image_text", "image-text-to-text", ("image_column", "question_column", "answer_column"),
                headline=("attribute_accuracy", "exact_match", "chrf"),
                select_by=("exact_match", "attribute_accuracy", "chrf"), peft_task_type="CAUSAL_LM",
                group_by_length=False),
}
EVAL_KINDS = tuple(name for name, task in TASKS.items() if not task.scored_as)  # what `llmkit eval` scores
FINETUNE_TASKS = tuple(name for name, task in TASKS.items() if task.fine_tunable)
MULTITASK_TASKS = tuple(name for name, task in TASKS.items() if task.shares_encoder)  # [[finetune.tasks]]


def selection_metrics(name: str) -> tuple[str, ...]:
    """The metrics that can pick a fine-tuning run's checkpoint: the task's scores, then the loss."""
    return (*TASKS[name].select_by, "loss")


def scorer_of(name: str) -> str:
    """The task whose scorer measures a model trained for `name` (instruction tuning: generation)."""
    return TASKS[name].scored_as or name


def columns_of(kind: str, settings) -> tuple[list[str], int]:
    """The column names a task reads, as `settings` (llmkit.settings.Columns) names them, and how many of
    the first ones must be text."""
    task = TASKS[kind]
    optional = [getattr(settings, field) for field in task.optional_columns if getattr(settings, field)]
    return [getattr(settings, field) for field in task.columns] + optional, task.text_columns
