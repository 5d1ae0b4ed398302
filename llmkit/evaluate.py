"""`llmkit eval`: score one or more models on one or more tasks, side by side.

    from llmkit import load_recipe
    from llmkit.evaluate import run

    results = run(load_recipe("eval-ppl"), models=["runs/pretrain-zh-tiny"])

Each task reads its data once (every input is checked before any model loads); each model is loaded
once per head. Results: a rich table, `eval.output` (JSON), and a row in each run's metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from llmkit.corpora import BUILTIN_CORPORA
from llmkit.data import count_chars, load_rows, split_documents
from llmkit.errors import LlmkitError
from llmkit.models import model_positions
from llmkit.rundir import OWNER_MARK, append_jsonl, write_json
from llmkit.settings import EvalTask, GenerateSettings, Recipe

HEAD_FOR_KIND = {
    "perplexity": "causal-lm",
    "classification": "sequence-classification",
    "token-classification": "token-classification",
    "extractive-qa": "question-answering",
    "generation": "causal-lm",
}
RESULTS_MARK = "llmkit eval"  # "made_by" of the results file: the only file eval.output may replace
EVALUATIONS_FILE = "evaluations.jsonl"  # in a run folder: every `llmkit eval` of that run, one row per task
MAX_WINDOW = 1024  # perplexity window when the model allows longer
MAX_ANSWER_TOKENS = 30  # extractive QA: longest answer span considered
HEADLINE = {  # metric shown in the side-by-side table, in this order
    "perplexity": ("loss_per_char", "perplexity", "loss"),
    "classification": ("accuracy", "f1"),
    "token-classification": ("f1", "precision", "recall"),
    "extractive-qa": ("exact_match", "f1"),
    "generation": ("bleu", "chrf", "rouge_l"),
}


@dataclass
class EvalResult:
    model: str
    task: str
    kind: str
    metrics: dict


def task_name(task: EvalTask) -> str:
    return task.name or f"{task.kind}:{Path(task.source).name}"


def task_columns(task: EvalTask) -> tuple[list[str], int]:
    """Columns a task reads, and how many of the first ones must be text."""
    columns = {
        "perplexity": ([task.text_column], 1),
        "classification": ([task.text_column, task.label_column] + ([task.text_pair_column] if task.text_pair_column else []), 1),
        "token-classification": ([task.tokens_column, task.tags_column], 0),
        "extractive-qa": ([task.context_column, task.question_column, task.answers_column], 2),
        "generation": ([task.prompt_column, task.reference_column], 1),
    }
    return columns[task.kind]


def task_rows(task: EvalTask, limit: int) -> list[dict]:
    """The rows a task scores: for a built-in corpus, its held-out last fraction; a file is scored whole."""
    columns, text_columns = task_columns(task)
    rows = load_rows(task.source, columns, hub_split=task.hub_split, text_columns=text_columns)
    if task.split == "validation" and task.source in BUILTIN_CORPORA and task.kind == "perplexity":
        documents = split_documents([row[task.text_column] for row in rows], task.validation_fraction)[1]
        rows = [{task.text_column: doc} for doc in documents]
    return rows[:limit] if limit else rows


def run(recipe: Recipe, models: list[str] | None = None, limit: int | None = None) -> list[EvalResult]:
    from llmkit.console import console, quiet_libraries
    from llmkit.models import load_model, resolve_model

    quiet_libraries()
    settings = recipe.eval
    check_results_file(Path(settings.output))
    limit = settings.limit if limit is None else limit
    data = {task_name(task): (task, task_rows(task, limit)) for task in settings.tasks}
    sources = [resolve_model(name, recipe.run.output_dir) for name in (models or settings.models or [None])]
    results = []
    for source in sources:
        loaded: dict[str, tuple] = {}
        for name, (task, rows) in data.items():
            head = HEAD_FOR_KIND[task.kind]
            if head not in loaded:
                loaded[head] = load_model(source, device=settings.device, head=head)
            model, tokenizer = loaded[head]
            with console.status(f"{Path(source).name}: {name} ({len(rows):,} examples)"):
                start = time.perf_counter()
                metrics = SCORERS[task.kind](model, tokenizer, task, rows, settings.batch_size)
            metrics["seconds"] = round(time.perf_counter() - start, 2)
            results.append(EvalResult(source, name, task.kind, metrics))
    report(results, settings.output, console)
    return results


def report(results: list[EvalResult], output: str, console) -> None:
    """One table (rows: task metric, columns: models), the JSON file, and a row per run's metrics.jsonl."""
    from rich.table import Table

    models = list(dict.fromkeys(r.model for r in results))
    table = Table(title="llmkit eval")
    table.add_column("task")
    table.add_column("metric")
    for model in models:
        table.add_column(Path(model).name or model, justify="right")
    by_key = {(r.model, r.task): r for r in results}
    for task in dict.fromkeys(r.task for r in results):
        kind = next(r.kind for r in results if r.task == task)
        for metric in HEADLINE[kind]:
            cells = [format_metric(by_key[(m, task)].metrics.get(metric)) for m in models]
            table.add_row(task, metric, *cells)
    console.print(table)
    write_json(Path(output), {"made_by": RESULTS_MARK, "results": [vars(r) for r in results]})
    console.print(f"results written to {output}")
    for result in results:  # a run keeps its scores beside its training metrics, in a file of their own
        if (Path(result.model) / OWNER_MARK).is_file():
            append_jsonl(Path(result.model) / EVALUATIONS_FILE,
                         {"eval_task": result.task, "eval_kind": result.kind, **result.metrics})


def check_results_file(path: Path) -> None:
    """eval.output is a .json file: new, or one that llmkit eval wrote (never a file a user made)."""
    if path.suffix != ".json":
        raise LlmkitError(f"eval.output must be a .json file, got {str(path)!r}")
    if path.is_dir():
        raise LlmkitError(f"eval.output {path} is a folder; name a .json file")
    if path.exists():
        try:
            made_by = json.loads(path.read_text(encoding="utf-8")).get("made_by")
        except (OSError, ValueError, AttributeError):
            made_by = None
        if made_by != RESULTS_MARK:
            raise LlmkitError(f"eval.output {path} exists and is not an llmkit eval result; name another file")


def format_metric(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- scorers, one per task kind


def score_perplexity(model, tokenizer, task: EvalTask, rows: list[dict], batch_size: int) -> dict:
    """Sliding-window perplexity over the documents joined as in pretraining (each closed by </s>):
    every token is scored once, with up to `context_length - stride` tokens of context carried over."""
    import torch

    documents = [row[task.text_column] for row in rows]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [token for ids in tokenizer(documents)["input_ids"] for token in ids + eos]
    window = task.context_length or min(model_positions(model.config) or MAX_WINDOW, MAX_WINDOW)
    stride = min(task.stride or max(window // 2, 1), window)
    spans, scored_until = [], 0
    for begin in range(0, max(len(stream) - 1, 1), stride):
        end = min(begin + window, len(stream))
        spans.append((begin, end, end - max(scored_until, begin + 1)))  # tokens not scored before
        scored_until = end
        if end == len(stream):
            break
    total_nll, scored = 0.0, 0
    with torch.no_grad():
        for group in batches_of_equal_length(spans, batch_size):
            ids = torch.tensor([stream[b:e] for b, e, _ in group], device=model.device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            for row, (_, _, new) in zip(nll, group):
                total_nll += row[-new:].sum().item()
                scored += new
    chars = count_chars(documents)
    loss = total_nll / scored
    return {"loss": loss, "perplexity": math.exp(loss), "loss_per_char": total_nll / chars,
            "tokens": scored, "chars": chars, "window": window, "stride": stride}


def batches_of_equal_length(spans: list[tuple], size: int):
    group: list[tuple] = []
    for span in spans:
        if group and (len(group) == size or span[1] - span[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def predict(model, tokenizer, texts, pairs=None, **options):
    """Model output for one batch, padded on the right (position 0 holds [CLS] in BERT-style models)."""
    import torch

    tokenizer.padding_side = "right"
    options = {"truncation": True, **options}
    encoded = tokenizer(texts, pairs, max_length=model_positions(model.config) or MAX_WINDOW, padding=True, return_tensors="pt",
                        **options)
    inputs = {k: v.to(model.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        return model(**inputs), encoded


def score_classification(model, tokenizer, task: EvalTask, rows: list[dict], batch_size: int) -> dict:
    from llmkit.metrics import classification_metrics

    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    references = [label_name(row[task.label_column], id2label) for row in rows]
    unknown = sorted(set(references) - set(id2label.values()))
    if unknown:
        raise LlmkitError(f"{task.source}: label {unknown[0]!r} is not one of the model's labels "
                          f"{sorted(id2label.values())}")
    predictions = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        pairs = [row[task.text_pair_column] for row in batch] if task.text_pair_column else None
        output, _ = predict(model, tokenizer, [row[task.text_column] for row in batch], pairs)
        predictions += [id2label[i] for i in output.logits.argmax(-1).tolist()]
    return classification_metrics(predictions, references, labels=list(id2label.values()))


def label_name(label, id2label: dict[int, str]) -> str:
    """A gold label as the model names it: ids map through id2label, names stay."""
    if isinstance(label, int) and not isinstance(label, bool) and label in id2label:
        return id2label[label]
    return str(label)


def score_token_classification(model, tokenizer, task: EvalTask, rows: list[dict], batch_size: int) -> dict:
    """Entity-level scores; each word takes the prediction of its first sub-token."""
    from llmkit.metrics import entity_metrics

    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    predicted, references = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        words = [list(row[task.tokens_column]) for row in batch]
        output, encoded = predict(model, tokenizer, words, is_split_into_words=True)
        logits = output.logits[:, -encoded["input_ids"].shape[1]:]  # prompt tuning puts virtual tokens first
        for index, row in enumerate(batch):
            tags = ["O"] * len(words[index])
            seen = set()
            for position, word in enumerate(encoded.word_ids(index)):
                if word is not None and word not in seen:
                    seen.add(word)
                    tags[word] = id2label[int(logits[index, position].argmax())]
            predicted.append(tags)
            references.append(list(row[task.tags_column]))
    return entity_metrics(predicted, references)


def score_extractive_qa(model, tokenizer, task: EvalTask, rows: list[dict], batch_size: int) -> dict:
    """The best-scoring span (start <= end, at most MAX_ANSWER_TOKENS) inside the context."""
    from llmkit.metrics import squad_metrics

    predictions = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        questions, contexts = [r[task.question_column] for r in batch], [r[task.context_column] for r in batch]
        output, encoded = predict(model, tokenizer, questions, contexts, truncation="only_second",
                                  return_offsets_mapping=True)
        for index, context in enumerate(contexts):
            in_context = [i for i, s in enumerate(encoded.sequence_ids(index)) if s == 1]
            length = encoded["input_ids"].shape[1]  # prompt tuning puts virtual tokens first
            starts, ends = output.start_logits[index, -length:], output.end_logits[index, -length:]
            best = max(((s, e) for s in in_context for e in in_context if s <= e < s + MAX_ANSWER_TOKENS),
                       key=lambda span: float(starts[span[0]] + ends[span[1]]), default=None)
            offsets = encoded["offset_mapping"][index]
            predictions.append(context[int(offsets[best[0]][0]):int(offsets[best[1]][1])] if best else "")
    return squad_metrics(predictions, [answer_texts(r[task.answers_column]) for r in rows])


def answer_texts(answers) -> list[str]:
    if isinstance(answers, dict):
        answers = answers.get("text", [])
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


def score_generation(model, tokenizer, task: EvalTask, rows: list[dict], batch_size: int) -> dict:
    """Greedy continuations of the prompts against the references: BLEU, chrF, ROUGE-L."""
    from llmkit.generate import generate_batch
    from llmkit.metrics import generation_metrics

    settings = replace(GenerateSettings(), greedy=True, max_new_tokens=task.max_new_tokens, repetition_penalty=1.0)
    outputs = generate_batch(model, tokenizer, [row[task.prompt_column] for row in rows], settings,
                             batch_size=batch_size)
    return generation_metrics([texts[0] for texts in outputs], [row[task.reference_column] for row in rows])


SCORERS = {
    "perplexity": score_perplexity,
    "classification": score_classification,
    "token-classification": score_token_classification,
    "extractive-qa": score_extractive_qa,
    "generation": score_generation,
}
