"""Prompting without training: a causal LM classifies by how likely it finds each label's words after a
prompt; no parameter changes.

Each template is filled with a row's text ({text}, and {text_pair} from text_pair_column) up to {label}.
A label's score is the log of the summed probability of its words (the verbalizer) as the continuation of
that prompt; a word's probability is the product of its tokens'. k demonstrations come first, the same for
every row: drawn with demonstration_seed from demonstration_source (never one of the scored rows), each
rendered with the template and its label's first word, all followed by `separator`.

Calibration, as in "Calibrate Before Use" (Zhao et al. 2021): the label probabilities, normalised over the
labels, are divided by those the same prompt (demonstrations included) gives with content-free inputs in place
of the text ("N/A", "" and "[MASK]", averaged as in the paper); the prediction is the largest quotient
(W = diag(p_cf)^-1, b = 0). That removes the prompt's own leaning towards a label.

Reported for each template: accuracy and macro F1 (llmkit.metrics), with 95% bootstrap intervals over the
rows; beside them the majority-class baseline on the same rows (the most frequent label of the scored rows,
predicted for every row: the best any constant guess does), and whether the best template beats it: the
95% interval of its accuracy minus the baseline's, paired over the same resampled rows, lies above 0.
The best template is picked on the scored rows themselves, so a narrow win deserves a second data set.

Speed: the demonstrations are run once per template and their keys and values reused for every batch; the
inputs of a batch are left-padded (the padding sits between the demonstrations and the input, masked), so
that the next-token distribution is read at the same, last, position for the whole batch.
"""

from __future__ import annotations

import copy
import inspect
import random
import re
from collections import Counter

from llmkit import tasks
from llmkit.corpora import BUILTIN_DATASETS
from llmkit.data import load_rows
from llmkit.errors import LlmkitError
from llmkit.loading import model_positions
from llmkit.task_kinds.common import MAX_LENGTH

CONTENT_FREE = ("N/A", "", "[MASK]")  # inputs without content whose label probabilities calibrate (Zhao et al.)
RESAMPLES = 2000  # bootstrap resamples of the rows for the confidence intervals
BOOTSTRAP_SEED = 1234
SLOT = re.compile(r"\{(text|text_pair|label)\}")


def words_of(verbalizer: dict) -> dict[str, list[str]]:
    """label -> its words (a single word may be given as a string)."""
    return {str(label): [words] if isinstance(words, str) else list(words) for label, words in verbalizer.items()}


def check_rows(task, rows: list[dict], where: str) -> None:
    """Every label of the data has words and every label of the verbalizer occurs in the data; the
    demonstrations' source is read and checked too, all before a model loads."""
    labels = list(words_of(task.verbalizer))
    found = {str(row[task.label_column]) for row in rows}
    missing = [label for label in labels if label not in found]
    if missing:
        raise LlmkitError(f"{where}.verbalizer: label {missing[0]!r} never occurs in {task.source} "
                          f"(its labels: {', '.join(sorted(found))})")
    unknown = sorted(found - set(labels))
    if unknown:
        raise LlmkitError(f"{where}.verbalizer has no words for the label {unknown[0]!r} of {task.source}; "
                          f"give every label its words (labels: {', '.join(sorted(found))})")
    if task.demonstrations:
        demonstration_pool(task, rows, where)


def demonstration_pool(task, rows: list[dict], where: str) -> list[dict]:
    """The rows demonstrations may be drawn from: those of demonstration_source (by default the train split of
    the source's built-in data set) that are not among `rows`, the rows scored."""
    source = task.demonstration_source
    if not source:
        name = task.source.partition(":")[0]
        if name not in BUILTIN_DATASETS:
            raise LlmkitError(f"{where}.demonstration_source: set it ({where}.demonstrations = {task.demonstrations}, "
                              f"and {task.source} is not a built-in data set, whose train split would be used)")
        source = f"{name}:train"
    columns, text_columns = tasks.columns_of(task.kind, task)
    scored = {key_of(task, row) for row in rows}
    pool = [row for row in load_rows(source, columns, hub_split="train", text_columns=text_columns)
            if key_of(task, row) not in scored]
    labels = words_of(task.verbalizer)
    unknown = next((row[task.label_column] for row in pool if str(row[task.label_column]) not in labels), None)
    if unknown is not None:
        raise LlmkitError(f"{where}.demonstration_source {source}: label {unknown!r} has no words in {where}.verbalizer")
    if len(pool) < task.demonstrations:
        raise LlmkitError(f"{where}.demonstrations = {task.demonstrations}, but {source} holds only {len(pool)} "
                          f"rows that are not scored")
    return pool


def key_of(task, row: dict) -> tuple:
    return row[task.text_column], row.get(task.text_pair_column) if task.text_pair_column else None


def draw_demonstrations(task, rows: list[dict]) -> list[dict]:
    """k rows of the demonstration source, drawn with demonstration_seed; never one of `rows`."""
    if not task.demonstrations:
        return []
    pool = demonstration_pool(task, rows, "eval task")
    return random.Random(task.demonstration_seed).sample(pool, task.demonstrations)


def fill(template: str, task, row: dict, label_word: str | None = None) -> str:
    """The template with the row's text in it: whole with a label word, else up to where the label goes."""
    if label_word is None:
        template = template[:template.index("{label}")]
    values = {"text": str(row[task.text_column]), "label": label_word or "",
              "text_pair": str(row[task.text_pair_column]) if task.text_pair_column else ""}
    return SLOT.sub(lambda match: values[match.group(1)], template)


def leading_tokens(tokenizer) -> list[int]:
    """What the tokenizer puts before a text (BOS, for most causal LMs), as pretraining saw it."""
    return [i for i in tokenizer("")["input_ids"] if i != tokenizer.eos_token_id]


def continuation_log_probs(model, tokenizer, shared: str, queries: list[str], words: list[list[int]],
                           batch_size: int) -> tuple:
    """log p(word | shared + query) for every query and word (token ids), as a queries x words tensor, and
    how many queries were cut (their beginning dropped) to fit the model's positions. `shared` (the
    demonstrations) is run once; its keys and values serve every batch."""
    import torch

    shared_ids = leading_tokens(tokenizer) + tokenizer(shared, add_special_tokens=False)["input_ids"]
    room = (model_positions(model.config) or MAX_LENGTH) - len(shared_ids) - max(map(len, words)) + 1
    if room < 1:
        raise LlmkitError(f"the demonstrations take {len(shared_ids)} tokens, more than the model's "
                          f"{model_positions(model.config)} positions leave for an input: use fewer")
    encoded = [tokenizer(query, add_special_tokens=False)["input_ids"] for query in queries]
    truncated = sum(len(ids) > room for ids in encoded)
    if not shared_ids and not all(encoded):
        raise LlmkitError("an input of no tokens, and the tokenizer puts no BOS before it: nothing to score the "
                          "label after; put text before {text} in the template")
    # The last shared token goes with each input: an input of no tokens ("" for calibration) still has one.
    encoded = [shared_ids[-1:] + ids[-room:] if ids else shared_ids[-1:] for ids in encoded]
    shared_ids = shared_ids[:-1]
    base = getattr(model, "get_base_model", lambda: model)()
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    device, start = model.device, len(shared_ids)
    scores = torch.zeros(len(queries), len(words))
    with torch.no_grad():
        past = model(input_ids=torch.tensor([shared_ids], device=device), use_cache=True).past_key_values \
            if shared_ids else None
        order = sorted(range(len(queries)), key=lambda i: len(encoded[i]))
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            lengths = torch.tensor([len(encoded[i]) for i in batch], device=device)
            width = int(lengths.max())
            ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, device=device)
            mask = torch.zeros((len(batch), start + width), dtype=torch.long, device=device)
            mask[:, :start] = 1
            for row, i in enumerate(batch):  # left padding: each input ends at the last position
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], device=device)
                mask[row, start + width - len(encoded[i]):] = 1
            positions = (start + torch.arange(width, device=device) - (width - lengths)[:, None]).clamp(min=start)
            cache = None
            if past is not None:
                cache = copy.deepcopy(past)
                cache.batch_repeat_interleave(len(batch))
            output = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True, **keep_last)
            next_token = torch.log_softmax(output.logits[:, -1].float(), dim=-1)
            cache = output.past_key_values
            for column, word in enumerate(words):
                score = next_token[:, word[0]].clone()
                if len(word) > 1:  # the rest of the word's tokens, after the input
                    rest = torch.tensor(word, device=device)
                    steps = len(word) - 1
                    logits = model(input_ids=rest[:-1].expand(len(batch), steps),
                                   attention_mask=torch.cat([mask, mask.new_ones(len(batch), steps)], dim=1),
                                   position_ids=start + lengths[:, None] + torch.arange(steps, device=device),
                                   past_key_values=cache, use_cache=True).logits.float()
                    score += torch.log_softmax(logits, dim=-1).gather(
                        2, rest[1:].expand(len(batch), steps)[..., None]).squeeze(-1).sum(dim=1)
                    cache.crop(-steps)  # back to the input's end (a negative count removes, in every transformers)
                scores[batch, column] = score.cpu()
    return scores, truncated


def label_scores(word_scores, columns: list[list[int]]):
    """A label's score: the log of the summed probability of its words (columns of word_scores)."""
    import torch

    return torch.stack([torch.logsumexp(word_scores[:, cols], dim=1) for cols in columns], dim=1)


def calibrate(scores, content_free):
    """Calibrate Before Use: log(p / p_cf) per label, p the label probabilities of each row normalised over the
    labels, p_cf their mean over the content-free inputs (rows of content_free). Returns (calibrated scores,
    p_cf)."""
    import torch

    reference = torch.softmax(content_free, dim=-1).mean(dim=0)
    return torch.log_softmax(scores, dim=-1) - torch.log(reference), reference


def score(model, tokenizer, task, rows: list[dict], batch_size: int) -> dict:
    """Each template's calibrated (or, calibrate = false, plain) predictions scored against the rows' labels,
    beside the majority class; "truncated": the most inputs of one template cut to fit the model."""
    from llmkit.metrics import bootstrap_intervals, classification_metrics

    verbalizer = words_of(task.verbalizer)
    labels = list(verbalizer)
    words = [word for label in labels for word in verbalizer[label]]
    columns, taken = [], 0
    for label in labels:
        columns.append(list(range(taken, taken + len(verbalizer[label]))))
        taken += len(verbalizer[label])
    word_ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
    empty = next((word for word, ids in zip(words, word_ids) if not ids), None)
    if empty is not None:
        raise LlmkitError(f"{task.source}: the verbalizer word {empty!r} becomes no tokens with this tokenizer")
    references = [str(row[task.label_column]) for row in rows]
    demonstrations = draw_demonstrations(task, rows)
    content_free = [{task.text_column: text, task.text_pair_column: text} for text in CONTENT_FREE]
    per_template, predictions, truncated = [], {}, 0
    for number, template in enumerate(task.templates, start=1):
        shared = "".join(fill(template, task, row, verbalizer[str(row[task.label_column])][0]) + task.separator
                         for row in demonstrations)
        queries = [fill(template, task, row) for row in [*rows, *content_free]]
        word_scores, cut = continuation_log_probs(model, tokenizer, shared, queries, word_ids, batch_size)
        truncated = max(truncated, cut)
        scores = label_scores(word_scores, columns)
        calibrated, reference = calibrate(scores[:len(rows)], scores[len(rows):])
        plain = [labels[i] for i in scores[:len(rows)].argmax(dim=1).tolist()]
        chosen = [labels[i] for i in calibrated.argmax(dim=1).tolist()] if task.calibrate else plain
        predictions[f"template {number}"] = chosen
        metrics = classification_metrics(chosen, references, labels=labels)
        per_template.append({
            "template": template, "accuracy": metrics["accuracy"], "f1": metrics["f1"],
            "uncalibrated_accuracy": classification_metrics(plain, references, labels=labels)["accuracy"],
            "content_free_probabilities": dict(zip(labels, [round(float(p), 6) for p in reference])),
            "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"]})
    counts = Counter(references)
    majority = max(labels, key=lambda label: counts[label])  # the first of equals, in the verbalizer's order
    best = max(range(len(per_template)), key=lambda i: per_template[i]["accuracy"])  # the first of equals
    predictions["majority"] = [majority] * len(rows)
    intervals = bootstrap_intervals(references, predictions, labels, resamples=RESAMPLES, seed=BOOTSTRAP_SEED,
                                    differences=[(f"template {best + 1}", "majority")])
    for number, entry in enumerate(per_template, start=1):
        entry.update(intervals[f"template {number}"])
    majority_accuracy = counts[majority] / len(rows)
    gain = intervals[f"template {best + 1} - majority"]["accuracy_ci95"]
    return {
        "accuracy": per_template[best]["accuracy"], "accuracy_ci95": per_template[best]["accuracy_ci95"],
        "f1": per_template[best]["f1"], "f1_ci95": per_template[best]["f1_ci95"], "best_template": best + 1,
        "majority_label": majority, "majority_accuracy": majority_accuracy,
        "majority_accuracy_ci95": intervals["majority"]["accuracy_ci95"],
        "gain_over_majority": per_template[best]["accuracy"] - majority_accuracy, "gain_over_majority_ci95": gain,
        "beats_majority": gain[0] > 0, "calibrated": task.calibrate, "labels": labels,
        "demonstrations": [{column: row[column] for column in tasks.columns_of(task.kind, task)[0]}
                           for row in demonstrations],
        "templates": per_template, "count": len(rows), "truncated": truncated,
    }


def table_cells(metrics: dict) -> list[tuple[str, object]]:
    """Each template's accuracy and macro F1 with their intervals; beside them the majority baseline's accuracy
    (its label is in the JSON), which template is best, its gain over the baseline and whether it beats it."""
    cells = []
    for number, entry in enumerate(metrics["templates"], start=1):
        cells += [(f"accuracy #{number}", (entry["accuracy"], entry["accuracy_ci95"])),
                  (f"f1 #{number}", (entry["f1"], entry["f1_ci95"]))]
    return cells + [
        ("majority accuracy", (metrics["majority_accuracy"], metrics["majority_accuracy_ci95"])),
        ("best template", f"#{metrics['best_template']}"),
        ("best - majority", (metrics["gain_over_majority"], metrics["gain_over_majority_ci95"])),
        ("beats majority", metrics["beats_majority"]),
    ]
