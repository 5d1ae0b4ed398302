"""`llmkit quantize`: compress a model and report what it cost, measured before and after.

    from llmkit import load_recipe
    from llmkit.quantize import run

    report = run(load_recipe("quantize-nf4"))

Methods: bitsandbytes int8 (LLM.int8) / NF4 / FP4 (saved quantized: transformers loads them as saved),
dynamic int8 (torch.ao: saved in fp32, int8 linear layers applied as llmkit loads it; fast on CPUs) and
magnitude pruning (llmkit.prune), optionally followed by a recovery fine-tune.

check the input (nothing is written) -> measure the source -> compress into a hidden folder beside the
output -> reload that folder and measure it -> report (table, quantization_report.json, model card) ->
the folder takes the output's name. The source model is only read.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.rundir import check_replaceable, write_json, write_text
from llmkit.settings import QuantizeSettings, Recipe

MARKER = "llmkit_quantization"  # config.json key; "dynamic-int8": fp32 weights, int8 linear layers made at load
REPORT_FILE = "quantization_report.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
METHOD_ALIASES = {"nf4": "bnb-nf4", "fp4": "bnb-fp4"}  # short names the command line accepts
BNB_CPU_VERSION = "0.45"  # bitsandbytes quantizes on CPUs from this version


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
    from llmkit.console import console, quiet_libraries
    from llmkit.evaluate import HEAD_FOR_KIND, task_rows
    from llmkit.models import resolve_model
    from llmkit.rundir import claimed, locked, run_dir_for, staging_for, swap_in

    quiet_libraries()
    settings = recipe.quantize
    source = resolve_model(settings.model or None, recipe.run.output_dir)
    output = Path(settings.output) if settings.output else run_dir_for(recipe.run.output_dir, recipe.run.name)
    check_output(source, output, overwrite)
    check_source(source, settings)
    head = HEAD_FOR_KIND[settings.task.kind]
    if settings.recovery_steps and head != "causal-lm":
        raise LlmkitError("quantize.recovery_steps: the recovery fine-tune trains causal language models only")
    rows = task_rows(settings.task, settings.limit)
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
    console.print(report_table(report))
    if note := kept_note(report):
        console.print(note, highlight=False)
    console.print(f"[bold green]done[/]: {settings.method} model saved in {output} (report: {output / REPORT_FILE})",
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

    from llmkit.models import first_line

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
        import torch

        if not set(torch.backends.quantized.supported_engines) - {"none"}:
            raise LlmkitError("dynamic-int8 needs a PyTorch build with a quantized CPU engine (x86/fbgemm or "
                              "qnnpack); this one has none")


def check_bitsandbytes(method: str) -> None:
    from importlib import metadata

    import torch
    from packaging.version import Version

    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        raise LlmkitError(f"{method} needs bitsandbytes: pip install 'bitsandbytes>={BNB_CPU_VERSION}'") from None
    if not torch.cuda.is_available() and Version(version) < Version(BNB_CPU_VERSION):
        raise LlmkitError(f"{method} without a CUDA GPU needs bitsandbytes >= {BNB_CPU_VERSION} "
                          f"(installed: {version}): pip install -U bitsandbytes")


# ---------------------------------------------------------------- compressing


def compress(source: str, settings: QuantizeSettings, destination: Path, head: str = "causal-lm",
             recipe: Recipe | None = None) -> dict:
    """Write the compressed model (and the source's tokenizer) to `destination`; returns the method's
    details for the report. `recipe` gives [data] and [train] to a recovery fine-tune."""
    from llmkit.models import load_pretrained
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


def bnb_config(source: str, settings: QuantizeSettings, auto_class):
    import torch
    from transformers import BitsAndBytesConfig

    from llmkit.bnb import four_bit_config

    if settings.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=settings.int8_threshold)
    return four_bit_config(source, auto_class, quant_type=settings.method.removeprefix("bnb-"),
                           double_quant=settings.double_quant, compute_dtype=getattr(torch, settings.compute_dtype))


def quantize_bitsandbytes(source: str, settings: QuantizeSettings, head: str):
    import bitsandbytes as bnb
    import torch
    import transformers

    from llmkit.bnb import WHY_KEPT, four_bit_misfits
    from llmkit.models import HEADS, first_line, pick_device

    auto_class = getattr(transformers, HEADS[head])
    config = bnb_config(source, settings, auto_class)
    try:
        model = auto_class.from_pretrained(source, quantization_config=config, device_map={"": pick_device("auto")},
                                           dtype=getattr(torch, settings.dtype))
    except (ValueError, NotImplementedError, RuntimeError) as error:
        raise LlmkitError(f"bitsandbytes cannot quantize {source}: {first_line(error)}") from None
    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    if not layers:
        raise LlmkitError(f"bitsandbytes found no linear layers to quantize in {source} "
                          f"({model.config.model_type}); try method = \"dynamic-int8\" or \"prune\"")
    details = {"bitsandbytes": {k: v for k, v in config.to_dict().items() if not k.startswith("_")},
               "quantized_layers": len(layers), "unquantized_tensors_dtype": settings.dtype}
    misfits = four_bit_misfits(model) if config.load_in_4bit else []
    if misfits:
        details["kept_in_full_precision"] = {"layers": misfits, "why": WHY_KEPT}
    return model, details


def prune_and_recover(model, tokenizer, settings: QuantizeSettings, recipe: Recipe) -> dict:
    from llmkit.prune import make_permanent, prune_model

    details = prune_model(model, settings.structure, settings.sparsity)
    if settings.recovery_steps:
        details["recovery"] = recover(model, tokenizer, recipe, settings.recovery_steps)
    make_permanent(model)
    return details


def recover(model, tokenizer, recipe: Recipe, steps: int) -> dict:
    """Fine-tune the pruned model `steps` steps on the recipe's [data] with its [train] settings, through
    the pretraining Trainer (pruning masks stay applied, so pruned weights stay zero)."""
    from llmkit.builders import check_block_size, training_arguments
    from llmkit.data import load_text_splits, pack_blocks
    from llmkit.pretrain import cache_dir, make_trainer

    check_block_size(recipe.data.block_size, model.config)
    train = dataclasses.replace(recipe.train, objective="causal", max_steps=steps, save_every=steps + 1)
    splits = load_text_splits(recipe.data)
    train_blocks, _ = pack_blocks(splits.train, tokenizer, recipe.data.block_size, cache_dir())
    eval_blocks, eval_tokens = pack_blocks(splits.validation, tokenizer, recipe.data.block_size, cache_dir())
    with tempfile.TemporaryDirectory() as work_dir:
        args = training_arguments(train, recipe.distributed, recipe.run.seed, Path(work_dir))
        trainer = make_trainer(dataclasses.replace(recipe, train=train), model, tokenizer, args, train_blocks,
                               eval_blocks, tokens_per_char=eval_tokens / splits.validation_chars, callbacks=[])
        trainer.train()
    model.to("cpu").eval()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"steps": steps, "learning_rate": train.learning_rate, "data": recipe.data.source,
            "final_training_loss": losses[-1] if losses else None}


# ---------------------------------------------------------------- dynamic int8 (the one place that names torch.ao)


def quantize_dynamic_int8(model):
    """int8 weights for every nn.Linear but the output layer, activations quantized on the fly: faster
    generation on CPUs. The output layer (next-token logits) stays fp32: a small share of the compute in
    larger models, and a little quality on small ones (quickstart model: perplexity +0.80% instead of
    +0.87%; per-channel weights give +0.79%: the rest is fbgemm's 7-bit dynamic activations).

    The adapter that `load_model` applies to a folder marked dynamic-int8; swap this body to change backend."""
    import warnings

    import torch

    output = model.get_output_embeddings()
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    layers = {name: qconfig for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not output}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that eager-mode quantization moves to torchao
        return torch.ao.quantization.quantize_dynamic(model.to("cpu"), layers, dtype=torch.qint8)


def packed_weights(model) -> list:
    """(weight, bias) of the linear layers whose int8 weights are packed (not among model.parameters())."""
    import torch

    return [m._weight_bias() for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]


# ---------------------------------------------------------------- measuring


def measure(path: str | Path, settings: QuantizeSettings, rows: list[dict], head: str, prompt: str,
            device: str = "auto") -> Measurement:
    """Load the model from disk as every command does and measure it."""
    import gc

    from llmkit.evaluate import SCORERS
    from llmkit.models import load_model
    from llmkit.prune import body_linears

    model, tokenizer = load_model(str(path), device=device, head=head)
    packed = [t for pair in packed_weights(model) for t in pair if t is not None]
    metrics = SCORERS[settings.task.kind](model, tokenizer, settings.task, rows, settings.batch_size)
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


def generation_speed(model, tokenizer, prompt: str, tokens: int, runs: int) -> float:
    """Greedy generation at batch 1 with the KV cache: tokens/s over exactly `tokens` new tokens, the
    median of `runs` runs after one warm-up."""
    import torch

    from llmkit.generate import encode
    from llmkit.generation import generation_kwargs
    from llmkit.settings import GenerateSettings

    settings = GenerateSettings(greedy=True, max_new_tokens=tokens, repetition_penalty=1.0)
    kwargs = generation_kwargs(settings, tokenizer) | {"min_new_tokens": tokens}
    inputs = encode(tokenizer, [prompt], model.device)
    rates = []
    with torch.inference_mode():
        for run_index in range(runs + 1):
            start = time.perf_counter()
            model.generate(**inputs, **kwargs)
            if run_index:
                rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


# ---------------------------------------------------------------- the report


def build_report(source: str, output: Path, settings: QuantizeSettings, details: dict, before: Measurement,
                 after: Measurement) -> dict:
    from llmkit.evaluate import task_name

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
    from llmkit.evaluate import HEADLINE

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
    for metric in dict.fromkeys(HEADLINE[kind] + ("perplexity",) * (kind == "perplexity")):
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
    """The output's model card: what was done, the report as a table, and how to load it."""
    from llmkit.evaluate import HEAD_FOR_KIND
    from llmkit.models import HEADS

    output = report["output"]
    dynamic = report["method"] == "dynamic-int8"
    auto_class = HEADS[HEAD_FOR_KIND[report["settings"]["task"]["kind"]]]
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
    write_text(path, "\n".join(lines) + "\n")
