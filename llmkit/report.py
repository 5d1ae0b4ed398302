"""What people look at after a run: the loss curve (PNG) and the model card (README.md)."""

from __future__ import annotations

from pathlib import Path

from llmkit.rundir import read_jsonl, write_text


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


def write_model_card(path: Path, *, name: str, description: str, loader: str, model, tokenizer, data: str,
                     steps: int, metrics: dict, samples: list[str]) -> None:
    """README.md of a model: what it is, how it was made, its scores, and how to load it."""
    parameters = sum(p.numel() for p in model.parameters())
    config = model.config
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
    lines += [f"| {key} | {value:.4f} |" for key, value in metrics.items() if isinstance(value, float)]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {loader}",
        f'model = {loader}.from_pretrained("{path.parent}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{path.parent}")',
        "```",
        "",
        "Files beside this card: `recipe.toml` (how it was made, re-runnable), `provenance.json` (versions, "
        "commit, data fingerprint), `metrics.jsonl` and `loss.png`.",
    ]
    if samples:
        lines += ["", "## Samples", ""] + [f"- {text}" for text in samples]
    write_text(path, "\n".join(lines) + "\n")
