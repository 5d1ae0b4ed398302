"""What people look at: the loss curve (PNG) and the model card (README.md) of a run, and heatmaps of
a model's attention over a text (PNG)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from llmkit.corpora import BUILTIN_CORPORA, BUILTIN_DATASETS
from llmkit.errors import LlmkitError
from llmkit.recipe import looks_local
from llmkit.rundir import read_jsonl, write_text
from llmkit.tasks import HEADS

CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans SC", "Noto Serif CJK SC",
             "Source Han Sans SC", "Source Han Sans CN", "Source Han Sans", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Hiragino Sans GB",
             "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN", "Arial Unicode MS")
FONT_PACKAGES = ("mplfonts", "noto_cjk_sans_otc", "noto_cjk")  # pip packages that ship CJK fonts
CJK_CHAR = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def plot_losses(metrics_path: Path, png_path: Path, title: str) -> None:
    """Training and validation loss against step, with validation loss per char when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    train = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    evals = [row for row in rows if "eval_loss" in row]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        axis.plot(*zip(*train), label="training loss (per token)", color="tab:blue", alpha=0.8)
    if evals:
        axis.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss (per token)",
                  color="tab:orange")
    if any("eval_loss_per_char" in r for r in evals):
        per_char = [(r["step"], r["eval_loss_per_char"]) for r in evals if "eval_loss_per_char" in r]
        axis.plot(*zip(*per_char), "s--", label="validation loss per char", color="tab:green")
    axis.set_xlabel("step")
    axis.set_ylabel("nats")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)


# ---------------------------------------------------------------- model card

TIMINGS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")  # logged beside scores
BUILTIN_LANGUAGE = "zh"  # the language of llmkit.corpora's corpora and data sets


@dataclass(frozen=True)
class Scores:
    """Metrics measured on one split of one data source: rows of the card's table and one `model-index`
    entry of its YAML."""

    source: str  # as the recipe names it: built-in NAME or NAME:SPLIT, hub dataset, file or folder
    split: str  # what the scores are of: "validation", "test", ...
    values: dict  # metric -> value; transformers' "eval_" prefix, its timings and non-floats are dropped


@dataclass(frozen=True)
class Origin:
    """What a model is and was made from: the card's pipeline tag, base_model, datasets, language and tags."""

    head: str  # a key of llmkit.tasks.HEADS
    base: str = ""  # the model it was made from (hub id or local path); "" = from scratch
    relation: str = ""  # how, in the hub's words (base_model_relation): finetune, adapter, quantized
    training: tuple[str, ...] = ()  # the data sources it learned from
    tags: tuple[str, ...] = ()  # what made it: pretrain, finetune, classification, lora, quantized, ...


def write_model_card(path: Path, *, name: str, description: str, origin: Origin, model, tokenizer, data: str,
                     steps: int, scores: list[Scores], samples: list[str], rows: dict[str, str] | None = None,
                     location: Path | None = None) -> None:
    """README.md of a model: what it is, how it was made, its scores, and how to load it; its YAML block
    says the same to the hub and other tools. `rows`: more lines of its table (label -> value) that are not
    the model's scores (a baseline's). `location`: the folder the model will be loaded from, when the card is
    written elsewhere first (a run written aside and swapped in by --overwrite); default: the card's folder."""
    location = location or path.parent
    parameters = sum(p.numel() for p in model.parameters())
    config = model.config.get_text_config()  # a vision-language model's: its language model's
    loader = HEADS[origin.head].auto_class
    reader = "AutoProcessor" if hasattr(tokenizer, "image_processor") else "AutoTokenizer"
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    lines = [
        f"# {name}",
        "",
        description,
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {parameters:,} |",
        f"| layers x width | {config.num_hidden_layers} x {config.hidden_size} |",
        f"| vocabulary | {len(tokenizer):,} tokens |",
        f"| data | {data} |",
        f"| steps | {steps:,} |",
    ]
    lines += [f"| {part.split} {metric} | {value:.4f} |"
              for part in scores for metric, value in measured(part.values).items()]
    lines += [f"| {label} | {value} |" for label, value in (rows or {}).items()]
    lines += use_and_samples([f"from transformers import {reader}, {loader}",
                              f'model = {loader}.from_pretrained("{location}")',
                              f'{reader.removeprefix("Auto").lower()} = {reader}.from_pretrained("{location}")'],
                             "`recipe.toml` (how it was made, re-runnable), `provenance.json` (versions, commit, "
                             "data fingerprint), `metrics.jsonl` and `loss.png`", samples)
    write_text(path, model_card(name, origin, scores, lines))


def use_and_samples(code: list[str], files: str, samples: list[str]) -> list[str]:
    """The end of a card: how to load the model, the files beside the card, and samples of its text."""
    lines = ["", "## Use", "", "```python", *code, "```", "", f"Files beside this card: {files}."]
    return lines + (["", "## Samples", "", *(f"- {text}" for text in samples)] if samples else [])


def write_ngram_card(path: Path, *, name: str, model, data: str, loss_per_char: float, samples: list[str],
                     run_dir: Path) -> None:
    """README.md of a character n-gram model (llmkit.ngram.NgramModel) that will be in `run_dir`: what it is,
    its score, how to load it."""
    lines = [
        f"# {name}",
        "",
        f"A character {model.order}-gram language model with interpolated absolute discounting, counted by llmkit "
        f"(`model.arch = \"ngram\"`): no neural network, the classic baseline of every causal pretraining run.",
        "",
        "| | |",
        "|---|---|",
        f"| order | {model.order} |",
        f"| counted n-grams | {sum(map(len, model.counts)):,} |",
        f"| vocabulary | {len(model.vocabulary):,} symbols (characters, </s>, <unk>) |",
        f"| discounts D per order | {', '.join(f'{d:.3f}' for d in model.discounts)} |",
        f"| data | {data} |",
        f"| validation loss_per_char | {loss_per_char:.4f} |",
    ]
    lines += use_and_samples(["from llmkit.ngram import NgramModel", f'model = NgramModel.load("{run_dir}")',
                              'model.probability("很", "昨天天气")'],
                             "`ngram.json.gz` (the counts), `recipe.toml` (how it was made, re-runnable), "
                             "`provenance.json` (versions, commit, data fingerprint), `final_metrics.json`", samples)
    write_text(path, "\n".join(lines) + "\n")


def model_card(name: str, origin: Origin, scores: list[Scores], lines: list[str]) -> str:
    """The text of a README.md: the YAML block (huggingface_hub's ModelCardData) above the Markdown `lines`;
    parsed back by huggingface_hub's ModelCard, so that what is written is what the hub reads."""
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{card_data(name, origin, scores).to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def card_data(name: str, origin: Origin, scores: list[Scores]):
    """library_name, tags, pipeline_tag, base_model (a hub id only: a local path means nothing on the hub,
    and the hub refuses a base_model it does not know), hub datasets trained on, the language of the
    built-in data, and the scores as `model-index`."""
    from huggingface_hub import ModelCardData

    results = eval_results(origin, scores)
    base = origin.base if hub_id(origin.base) else None
    sources = (*origin.training, *(part.source for part in scores))
    return ModelCardData(
        library_name="transformers",
        tags=["llmkit", *origin.tags],
        pipeline_tag=HEADS[origin.head].pipeline_tag,
        base_model=base,
        base_model_relation=origin.relation if base and origin.relation else None,
        datasets=[source for source in origin.training if hub_id(source)] or None,
        language=BUILTIN_LANGUAGE if any(builtin(source) for source in sources) else None,
        model_name=name if results else None,
        eval_results=results or None,
    )


def eval_results(origin: Origin, scores: list[Scores]) -> list:
    """One huggingface_hub EvalResult per metric: task type (the pipeline tag), data set (type = its id,
    name = as the recipe names it, split) and metric (type, value, name)."""
    from huggingface_hub import EvalResult

    results = []
    for part in scores:
        dataset, shown, split = dataset_of(part.source, part.split)
        results += [EvalResult(task_type=HEADS[origin.head].pipeline_tag, dataset_type=dataset, dataset_name=shown,
                               dataset_split=split, metric_type=metric, metric_value=value,
                               metric_name=f"{part.split} {metric}")
                    for metric, value in measured(part.values).items()]
    return results


def measured(values: dict) -> dict:
    """The scores in a dict of metrics: floats, without transformers' "eval_" prefix and its timings."""
    scores = {key.removeprefix("eval_"): value for key, value in values.items() if isinstance(value, float)}
    return {metric: value for metric, value in scores.items() if metric not in TIMINGS}


def dataset_of(source: str, split: str) -> tuple[str, str, str]:
    """(id, name, split) of a data source in a card: a built-in NAME:SPLIT names its own split; a local
    file or folder goes by its name, not by a path on this machine."""
    name, colon, named_split = source.partition(":")
    if builtin(source):
        return name, source, named_split if colon else split
    shown = source if hub_id(source) else Path(source).name
    return shown, shown, split


def builtin(source: str) -> bool:
    """A corpus or data set of llmkit.corpora (NAME or NAME:SPLIT)."""
    return source.partition(":")[0] in (*BUILTIN_CORPORA, *BUILTIN_DATASETS)


def hub_id(name: str) -> bool:
    """Whether a model or data source names a hub repository (owner/name, or a bare name such as gpt2)
    rather than something on this machine (llmkit.recipe.looks_local) or built in."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or builtin(name) or looks_local(name) or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ---------------------------------------------------------------- attention


def attention_weights(model, tokenizer, ids: list[int]):
    """(token labels, weights [layers, heads, tokens, tokens]) from one forward pass over `ids`."""
    import torch

    weights = attention_weights_of(model, {"input_ids": torch.tensor([ids], device=model.device)})
    return [token_label(tokenizer, token) for token in ids], weights


def attention_weights_of(model, inputs: dict):
    """Weights [layers, heads, tokens, tokens] of one forward pass over a batch of one (`inputs`: the model's
    keyword arguments), with eager attention (the fused kernels do not return weights)."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = inner.config._attn_implementation
    inner.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            output = model(**inputs, output_attentions=True, use_cache=False)
    finally:
        inner.set_attn_implementation(previous)
    if not output.attentions or output.attentions[0] is None:
        raise LlmkitError(f"{type(inner).__name__} does not return attention weights")
    return torch.stack([layer[0].float().cpu() for layer in output.attentions])


def token_label(tokenizer, token: int) -> str:
    text = tokenizer.decode([token])
    return text.replace("\n", "\\n").replace(" ", "␣") or tokenizer.convert_ids_to_tokens(token)


def find_cjk_font():
    """A font with Chinese glyphs: installed on the system, or shipped by a pip package; None if none."""
    from importlib.util import find_spec

    from matplotlib import font_manager

    installed = {font.name: font.fname for font in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in installed:
            return font_manager.FontProperties(fname=installed[name])
    for name, fname in installed.items():
        if re.search(r"CJK|Han Sans|Hei|Ming|Song|Kai", name):
            return font_manager.FontProperties(fname=fname)
    for package in FONT_PACKAGES:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(spec.submodule_search_locations[0])
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".otf", ".ttf", ".ttc"))
        preferred = [p for p in files if re.search(r"sanscjksc|cjk.*sc|hei", p.name, re.IGNORECASE)]
        for path in preferred + files:
            return font_manager.FontProperties(fname=str(path))
    return None


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        from llmkit.console import console

        console.print(f"warning: {message}", markup=False)


def label_font(tokens: list[str]):
    """A CJK font for the labels of a plot (None: matplotlib's default), with a warning, once, when the
    labels need one and there is none."""
    font = find_cjk_font()
    if font is None and any(CJK_CHAR.search(token) for token in tokens):
        warn_once("no CJK font found (install one, e.g. fonts-noto-cjk, or `pip install mplfonts`): "
                  "Chinese tokens in the attention plot show as boxes")
    return font


def plot_attention(tokens: list[str], weights, path: str | Path, layer: int | None = None,
                   head: int | None = None) -> Path:
    """A heatmap of attention per layer (heads averaged, or `head`), in a grid; `layer` picks one."""
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layers, n_heads = weights.shape[0], weights.shape[1]
    if layer is not None and not 0 <= layer < n_layers:
        raise LlmkitError(f"--attention-layer {layer}: the model has layers 0..{n_layers - 1}")
    if head is not None and not 0 <= head < n_heads:
        raise LlmkitError(f"--attention-head {head}: the model has heads 0..{n_heads - 1}")
    layers = [layer] if layer is not None else list(range(n_layers))
    font = label_font(tokens)
    columns = math.ceil(math.sqrt(len(layers)))
    rows = math.ceil(len(layers) / columns)
    side = min(max(4.0, 0.22 * len(tokens) + 1.5), 16.0)
    figure = Figure(figsize=(side * columns, side * rows), layout="constrained")
    FigureCanvasAgg(figure)
    label_size = max(3.0, min(10.0, 240 / max(len(tokens), 1)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        for index, number in enumerate(layers):
            axes = figure.add_subplot(rows, columns, index + 1)
            matrix = weights[number].mean(0) if head is None else weights[number, head]
            image = axes.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
            axes.set_title(f"layer {number}, " + ("heads averaged" if head is None else f"head {head}"))
            axes.set_xticks(range(len(tokens)))
            axes.set_yticks(range(len(tokens)))
            axes.set_xticklabels(tokens, rotation=90, fontsize=label_size, fontproperties=font)
            axes.set_yticklabels(tokens, fontsize=label_size, fontproperties=font)
            axes.set_xlabel("attended to (key)")
            axes.set_ylabel("attending (query)")
            figure.colorbar(image, ax=axes, shrink=0.8)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    return path


def plot_generation_attention(model, tokenizer, ids: list[int], path: str | Path,
                              layer: int | None = None, head: int | None = None) -> Path:
    """The attention heatmap over a generation's token ids (prompt + generated)."""
    tokens, weights = attention_weights(model, tokenizer, ids)
    return plot_attention(tokens, weights, path, layer, head)
