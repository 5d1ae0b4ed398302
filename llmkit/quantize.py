"""`llmkit quantize`: compress a model and report what it cost, measured before and after.

    from llmkit import load_recipe
    from llmkit.quantize import run

    report = run(load_recipe("quantize-nf4"))

Methods: bitsandbytes int8 (LLM.int8) / NF4 / FP4 (saved quantized: transformers loads them as saved),
dynamic int8 (torch.ao: saved in fp32, int8 linear layers applied as llmkit loads it; fast on CPUs) and
magnitude pruning (llmkit.compression), optionally followed by a recovery fine-tune.

check the input (nothing is written) -> measure the source -> compress into a hidden folder beside the
output -> reload that folder and measure it -> report (table, quantization_report.json, model card) ->
the folder takes the output's name. The source model is only read.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmkit import tasks
from llmkit.compression import MARKER
from llmkit.errors import LlmkitError, first_line
from llmkit.rundir import check_replaceable, write_json, write_text
from llmkit.settings import QuantizeSettings, Recipe
from llmkit.task_data import score, task_name, task_rows

REPORT_FILE = "quantization_report.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
METHOD_ALIASES = {"nf4": "bnb-nf4", "fp4": "bnb-fp4"}  # short names the command line accepts


@dataclass
class Measurement:
    parameters: int
    weights_bytes: int | None  # size of the weight files on disk (None: a hub model, not local)
    memory_bytes: int  # the loaded model's parameters and buffers (packed int8 weights included)
    metrics: dict  # the task's metrics (perplexity, loss per char, ...)
    tokens_per_second: float | None  # greedy generation at batch 1 (causal models)
    zero_weights: float  # share of the weights of the layer matrices (not embeddings) that are exactly zero


# ---------------------------------------------------------------- the command


def run(recipe: Recipe, overwrite: bool = False) -> dict:
    from llmkit.console import console, quiet_libraries, stdout
    from llmkit.loading import resolve_model
    from llmkit.rundir import claimed, locked, run_dir_for, staging_for, swap_in

    quiet_libraries()
    settings = recipe.quantize
    source = resolve_model(settings.model or None, recipe.run.output_dir, tasks.TASKS[settings.task.kind].head)
    output = Path(settings.output) if settings.output else run_dir_for(recipe.run.output_dir, recipe.run.name)
    check_output(source, output, overwrite)
    check_source(source, settings)
    head = tasks.TASKS[settings.task.kind].head
    if settings.recovery_steps and head != "causal-lm":
        raise LlmkitError("quantize.recovery_steps: the recovery fine-tune trains causal language models only")
    rows = task_rows(settings.task, settings.limit, "quantize.task")
    device = "cpu" if settings.method == "dynamic-int8" else "auto"  # torch.ao int8 kernels are CPU kernels
    prompt = recipe.generate.prompts[0] if recipe.generate.prompts else "今天"
    with console.status(f"measuring {source}"):
        before = measure(source, settings, rows, head, prompt, device)
    # Written beside the output, then swapped in: the output is replaced only by a complete result.
    with locked(output), claimed(staging_for(output), "quantized") as staging:
        report = compress_and_measure(source, staging, output, settings, head, recipe, before, rows, prompt, device)
        if output.exists() and not overwrite:
            raise LlmkitError(f"{output} appeared while quantizing; it was left alone and the result discarded")
        swap_in(staging, output)
    stdout.print(report_table(report))
    if note := kept_note(report):
        stdout.print(note, highlight=False)
    stdout.print(f"[bold green]done[/]: {settings.method} model saved in {output} (report: {output / REPORT_FILE})",
                  highlight=False)
    return report


def compress_and_measure(source: str, staging: Path, output: Path, settings: QuantizeSettings, head: str,
                         recipe: Recipe, before: Measurement, rows: list[dict], prompt: str, device: str) -> dict:
    """Compress into `staging`, reload it from disk, measure, and write the report there."""
    from llmkit.console import console

    with console.status(f"compressing ({settings.method})"):
        details = compress(source, settings, staging, head, recipe)
    with console.status(f"measuring the saved model ({settings.method})"):
        after = measure(staging, settings, rows, head, prompt, device)
    report = build_report(source, output, settings, details, before, after)
    write_json(staging / REPORT_FILE, report)
    write_card(staging / "README.md", report)
    return report


def check_output(source: str, output: Path, overwrite: bool) -> None:
    """Refuse an existing output (unless overwrite), and any output that would touch the source."""
    if Path(source).exists():
        src, out = Path(source).resolve(), output.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise LlmkitError(f"{output}: the output cannot be the source model {source}, inside it, or hold it")
    if output.exists() and not overwrite:
        raise LlmkitError(f"{output} exists; pass --overwrite to replace it, or set quantize.output")
    check_replaceable(output, "quantize.output")


def check_source(source: str, settings: QuantizeSettings) -> None:
    """Refuse a model that is already quantized, and a method this machine cannot run (naming what it needs)."""
    from transformers import AutoConfig

    from llmkit.compression import check_bitsandbytes, check_dynamic_int8

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise LlmkitError(f"cannot load a model from {source}: {first_line(error)}") from None
    quantized = getattr(config, "quantization_config", None) or getattr(config, MARKER, None)
    if quantized:
        how = quantized if isinstance(quantized, str) else dict(quantized).get("quant_method", "quantized")
        raise LlmkitError(f"{source} is already quantized ({how}); compress the original model instead")
    if settings.method.startswith("bnb-"):
        check_bitsandbytes(settings.method)
    if settings.method == "dynamic-int8":
        check_dynamic_int8()


# ---------------------------------------------------------------- compressing


def compress(source: str, settings: QuantizeSettings, destination: Path, head: str = "causal-lm",
             recipe: Recipe | None = None) -> dict:
    """Write the compressed model (and the source's tokenizer) to `destination`; returns the method's
    details for the report. `recipe` gives [data] and [train] to a recovery fine-tune."""
    from llmkit.compression import quantize_bitsandbytes
    from llmkit.loading import load_pretrained
    from llmkit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    if settings.method.startswith("bnb-"):
        model, details = quantize_bitsandbytes(source, settings, head)
    else:
        model = load_pretrained(source, "cpu", "float32", head)
        if settings.method == "dynamic-int8":
            model.config.update({MARKER: "dynamic-int8"})
            details = {"applied": "at load: torch.ao.quantization.quantize_dynamic, nn.Linear -> int8 weights "
                                  "(per tensor; the output layer stays fp32), activations quantized per batch; "
                                  "CPU only"}
        else:
            details = prune_and_recover(model, tokenizer, settings, recipe or Recipe())
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    return details


def prune_and_recover(model, tokenizer, settings: QuantizeSettings, recipe: Recipe) -> dict:
    from llmkit.compression import make_permanent, prune_model

    details = prune_model(model, settings.structure, settings.sparsity)
    if settings.recovery_steps:
        details["recovery"] = recover(model, tokenizer, recipe, settings.recovery_steps)
    make_permanent(model)
    return details


def recover(model, tokenizer, recipe: Recipe, steps: int) -> dict:
    """Fine-tune the pruned model `steps` steps on the recipe's [data] with its [train] settings, through
    the pretraining Trainer (pruning masks stay applied, so pruned weights stay zero)."""
    from llmkit.data import blocks_cache, load_text_splits, pack_blocks, training_blocks
    from llmkit.loading import check_block_size
    from llmkit.training import language_model_trainer, training_arguments

    check_block_size(recipe.data.block_size, model.config)
    train = dataclasses.replace(recipe.train, objective="causal", max_steps=steps, save_every=steps + 1)
    splits = load_text_splits(recipe.data)
    train_blocks = training_blocks(splits, tokenizer, recipe.data.block_size, recipe.run.seed)
    eval_blocks, eval_tokens = pack_blocks(splits.validation, tokenizer, recipe.data.block_size, blocks_cache())
    with tempfile.TemporaryDirectory() as work_dir:
        args = training_arguments(train, recipe.distributed, recipe.run.seed, Path(work_dir))
        trainer = language_model_trainer(dataclasses.replace(recipe, train=train), model, tokenizer, args,
                                         train_blocks, eval_blocks, eval_tokens / splits.validation_chars, callbacks=[])
        trainer.train()
    model.to("cpu").eval()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"steps": steps, "learning_rate": train.learning_rate, "data": recipe.data.source,
            "final_training_loss": losses[-1] if losses else None}


# ---------------------------------------------------------------- measuring


def measure(path: str | Path, settings: QuantizeSettings, rows: list[dict], head: str, prompt: str,
            device: str = "auto") -> Measurement:
    """Load the model from disk as every command does and measure it."""
    import gc

    from llmkit.compression import body_linears, packed_weights
    from llmkit.generation import generation_speed
    from llmkit.loading import load_model

    model, tokenizer = load_model(str(path), device=device, head=head)
    packed = [t for pair in packed_weights(model) for t in pair if t is not None]
    metrics = score(model, tokenizer, settings.task, rows, settings.batch_size)
    speed = (generation_speed(model, tokenizer, prompt, settings.speed_tokens, settings.speed_runs)
             if head == "causal-lm" else None)
    floats = [m.weight for m in body_linears(model) if m.weight.is_floating_point()]
    measurement = Measurement(
        parameters=model.num_parameters() + sum(t.numel() for t in packed),
        weights_bytes=weights_size(Path(path)) if Path(path).is_dir() else None,
        memory_bytes=model.get_memory_footprint() + sum(t.numel() * t.element_size() for t in packed),
        metrics=metrics, tokens_per_second=speed,
        zero_weights=sum(int((p == 0).sum()) for p in floats) / max(sum(p.numel() for p in floats), 1))
    del model
    gc.collect()
    return measurement


def weights_size(folder: Path) -> int:
    """Bytes of the weight files in a model folder, as saved."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


# ---------------------------------------------------------------- the report


def build_report(source: str, output: Path, settings: QuantizeSettings, details: dict, before: Measurement,
                 after: Measurement) -> dict:
    def ratio(new, old):
        return new / old if new is not None and old else None

    change = {"parameters": ratio(after.parameters, before.parameters),
              "weights_bytes": ratio(after.weights_bytes, before.weights_bytes),
              "memory_bytes": ratio(after.memory_bytes, before.memory_bytes),
              "tokens_per_second": ratio(after.tokens_per_second, before.tokens_per_second)}
    change |= {name: ratio(value, before.metrics.get(name)) for name, value in after.metrics.items()
               if isinstance(value, float)}
    return {"method": settings.method, "source": source, "output": str(output), "task": task_name(settings.task),
            "settings": dataclasses.asdict(settings), "details": details,
            "before": dataclasses.asdict(before), "after": dataclasses.asdict(after), "change_ratio": change,
            "measured": "after = the saved output reloaded from disk; speed: greedy generation at batch 1 of "
                        f"{settings.speed_tokens} tokens, median of {settings.speed_runs} runs (speed needs no "
                        "trained weights)"}


def report_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(measure, before, after, after/before) for the table and the model card."""
    before, after, change = report["before"], report["after"], report["change_ratio"]

    def row(label, key, show, source_before, source_after):
        ratio = change.get(key)
        return (label, show(source_before.get(key)), show(source_after.get(key)),
                "-" if ratio is None else f"{ratio:.4f}x")

    def number(value):
        return "-" if value is None else f"{value:,.4f}" if isinstance(value, float) else f"{value:,}"

    def megabytes(value):
        return "-" if value is None else f"{value / 1e6:,.2f} MB"

    rows = [row("parameters", "parameters", number, before, after),
            row("size on disk (weight files)", "weights_bytes", megabytes, before, after),
            row("memory footprint", "memory_bytes", megabytes, before, after)]
    kind = report["settings"]["task"]["kind"]
    for metric in tasks.TASKS[kind].headline:
        rows.append(row(f"{metric} ({report['task']})", metric, number, before["metrics"], after["metrics"]))
    rows.append(row("generation tokens/s", "tokens_per_second", number, before, after))
    if report["method"] == "prune":
        rows.append(("zero weights (layer matrices)", f"{before['zero_weights']:.2%}", f"{after['zero_weights']:.2%}", "-"))
    return rows


def kept_note(report: dict) -> str | None:
    """Which layers a 4-bit model keeps in full precision, and why (None when it keeps none)."""
    kept = report["details"].get("kept_in_full_precision")
    if not kept:
        return None
    return f"{len(kept['layers'])} linear layer(s) {kept['why']}: {', '.join(kept['layers'])}"


def report_table(report: dict):
    from rich.table import Table

    table = Table(title=f"llmkit quantize: {report['method']}")
    for name in ("measure", "before", "after", "after/before"):
        table.add_column(name, justify="left" if name == "measure" else "right")
    for row in report_rows(report):
        table.add_row(*row)
    return table


def write_card(path: Path, report: dict) -> None:
    """The output's model card: what was done, the report as a table, and how to load it; its YAML block
    (llmkit.report.model_card) names the source as base_model and holds the output's scores."""
    from llmkit.report import Origin, Scores, hub_id, model_card

    output = report["output"]
    dynamic = report["method"] == "dynamic-int8"
    task = report["settings"]["task"]
    head = tasks.TASKS[task["kind"]].head
    auto_class = tasks.HEADS[head].auto_class
    lines = [f"# {Path(output).name}", "",
             f"`{report['source']}` compressed with `llmkit quantize` (method `{report['method']}`).", "",
             "## Quantization report", "",
             "| measure | before | after | after/before |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in report_rows(report)]
    lines += ["", f"{report['measured']}. All figures: `{REPORT_FILE}`."]
    if note := kept_note(report):
        lines += ["", note + "."]
    lines += ["", "## Use", "",
              f"    llmkit generate --model {output} --prompt 今天", ""]
    if dynamic:
        lines.append("The weights are saved in fp32; llmkit makes the linear layers int8 (torch.ao dynamic "
                     "quantization, CPU) as it loads them. Plain transformers loads the fp32 weights only.")
    else:
        lines.append(f'Plain transformers: `{auto_class}.from_pretrained("{output}")` '
                     "(bitsandbytes models need bitsandbytes installed).")
    pruned, recovery = report["method"] == "prune", report["details"].get("recovery")
    origin = Origin(head, base=report["source"], relation="" if pruned else "quantized",
                    training=(recovery["data"],) if recovery else (),
                    tags=("pruned",) if pruned else ("quantized", report["method"]))
    split = task["hub_split"] if hub_id(task["source"]) else task["split"]
    write_text(path, model_card(Path(output).name, origin, [Scores(task["source"], split, report["after"]["metrics"])],
                                lines))
