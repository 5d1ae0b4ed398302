"""Generation speed of every `llmkit quantize` method against fp32, in one run.

The model is a Llama of the quickstart's architecture (its char vocabulary of the built-in corpus),
built from config at ~90M parameters by default (--d-model 768 --layers 12): random weights, since speed
needs no training. Each method's output is made and saved by llmkit.quantize.compress, reloaded the way
`llmkit generate` loads it, and timed with greedy generation at batch 1 (exactly --tokens new tokens);
the rounds alternate between methods so that machine noise hits all of them.

    python bench/quantize_speed.py [--d-model 768] [--layers 12] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import torch
import transformers

from llmkit.corpora import peoples_daily
from llmkit.generation import generation_speed
from llmkit.loading import load_model, model_config
from llmkit.quantize import compress, weights_size
from llmkit.settings import ModelSettings, QuantizeSettings, TokenizerSettings
from llmkit.tokenizer import train_tokenizer

METHODS = {  # label -> settings (None: the fp32 source itself)
    "fp32": None,
    "dynamic-int8": QuantizeSettings(method="dynamic-int8"),
    "bnb-int8": QuantizeSettings(method="bnb-int8"),
    "bnb-nf4": QuantizeSettings(method="bnb-nf4"),
    "bnb-fp4": QuantizeSettings(method="bnb-fp4"),
    "prune mlp-units 25%": QuantizeSettings(method="prune", structure="mlp-units", sparsity=0.25),
}
PROMPT = "昨天天气很"


def build_source(folder: Path, d_model: int, layers: int) -> Path:
    tokenizer = train_tokenizer([row["text"] for row in peoples_daily()], TokenizerSettings(vocab_size=6000), "causal")
    settings = ModelSettings(d_model=d_model, n_layer=layers, n_head=max(d_model // 64, 1), max_positions=512)
    transformers.set_seed(0)
    model = transformers.LlamaForCausalLM(model_config(settings, tokenizer, "causal"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per timed generation")
    parser.add_argument("--rounds", type=int, default=3, help="timed generations per method (median)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="MatMul8bitLt")  # bitsandbytes int8, once per call
    with tempfile.TemporaryDirectory() as work:
        source = build_source(Path(work) / "fp32", args.d_model, args.layers)
        folders = {}
        for label, settings in METHODS.items():
            folders[label] = source if settings is None else Path(work) / label.replace(" ", "-")
            if settings is not None:
                compress(str(source), settings, folders[label])
        models = {label: load_model(str(folder), device="cpu") for label, folder in folders.items()}
        parameters = models["fp32"][0].num_parameters()
        print(f"Llama {args.d_model} wide x {args.layers} layers, {parameters / 1e6:.1f}M parameters, random weights; "
              f"greedy, batch 1, {args.tokens} new tokens, {args.rounds} rounds, {torch.get_num_threads()} threads")
        rates: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(args.rounds):
            for label, (model, tokenizer) in models.items():
                rates[label].append(generation_speed(model, tokenizer, PROMPT, args.tokens, runs=1))
        base = statistics.median(rates["fp32"])
        base_size = weights_size(source)
        print(f"{'method':22} {'tokens/s':>9} {'x fp32':>7} {'size MB':>8} {'x fp32':>7}")
        for label, values in rates.items():
            speed, size = statistics.median(values), weights_size(folders[label])
            print(f"{label:22} {speed:9.1f} {speed / base:6.2f}x {size / 1e6:8.1f} {size / base_size:6.2f}x")


if __name__ == "__main__":
    main()
