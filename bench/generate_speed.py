"""Generation speed of `llmkit generate` against a bare `model.generate` call, in one run.

1. In-process: tokens/s and time to first token of llmkit.generation.generate_text and of a bare
   model.generate with the same model, prompt and greedy settings, alternating rounds (noise hits both).
2. Whole process: wall time of `llmkit generate --max-new-tokens 1` against a bare script that only
   imports transformers, loads the model and generates one token (what start-up must cost anyway).

Goal: llmkit >= 0.95 x bare throughput; start-up dominated by loading the model, not by the CLI.

    python bench/generate_speed.py [--model runs/pretrain-zh-tiny] [--tokens 200] [--rounds 5]

Without a trained model, a random one of the quickstart architecture is built (speed needs no weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmkit.generation import generate_text
from llmkit.loading import load_model
from llmkit.settings import GenerateSettings

PROMPT = "昨天天气很"


def quickstart_shaped_model(folder: Path) -> Path:
    """A random model with the quickstart recipe's architecture and a char tokenizer (for speed only)."""
    from llmkit import load_recipe
    from llmkit.loading import build_model
    from llmkit.corpora import peoples_daily
    from llmkit.tokenizer import train_tokenizer

    recipe = load_recipe("pretrain-zh-tiny")
    tokenizer = train_tokenizer([row["text"] for row in peoples_daily()], recipe.tokenizer, "causal")
    build_model(recipe, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bare_generate(model, tokenizer, tokens: int) -> tuple[float, float]:
    """(tokens/s, seconds to the first token) of model.generate with nothing around it."""
    inputs = tokenizer(PROMPT, return_tensors="pt")
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, **kwargs)
        first = time.perf_counter() - start
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=tokens, **kwargs)
        seconds = time.perf_counter() - start
    return (output.shape[1] - inputs["input_ids"].shape[1]) / seconds, first


def llmkit_generate(model, tokenizer, tokens: int) -> tuple[float, float]:
    # Greedy on both sides: the same tokens, stopping at the same end-of-text.
    settings = GenerateSettings(greedy=True, max_new_tokens=tokens, repetition_penalty=1.0)
    generation = generate_text(model, tokenizer, PROMPT, settings)
    return generation.tokens_per_second, generation.first_token_seconds


def process_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/pretrain-zh-tiny")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        source = Path(options.model)
        if not (source / "config.json").exists():
            print(f"{source} has no model: using a random model of the quickstart architecture")
            source = quickstart_shaped_model(Path(scratch) / "model")
        model, tokenizer = load_model(str(source))
        bare, ours = [], []
        bare_generate(model, tokenizer, 8)  # warm-up
        for _ in range(options.rounds):
            bare.append(bare_generate(model, tokenizer, options.tokens))
            ours.append(llmkit_generate(model, tokenizer, options.tokens))
        bare_script = ("import sys, transformers as t; m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
                       "k = t.AutoTokenizer.from_pretrained(sys.argv[1]); "
                       f"m.generate(**k('{PROMPT}', return_tensors='pt'), max_new_tokens=1)")
        bare_process = statistics.median(process_seconds([sys.executable, "-c", bare_script, str(source)])
                                         for _ in range(3))
        llmkit_process = statistics.median(process_seconds([sys.executable, "-m", "llmkit", "generate", "--model",
                                                            str(source), "--prompt", PROMPT, "--max-new-tokens", "1"])
                                           for _ in range(3))
        help_seconds = statistics.median(process_seconds([sys.executable, "-m", "llmkit", "--help"]) for _ in range(3))

    figures = {
        "model": str(options.model), "new_tokens": options.tokens, "rounds": options.rounds,
        "bare_tokens_per_s": round(statistics.median(r for r, _ in bare), 1),
        "llmkit_tokens_per_s": round(statistics.median(r for r, _ in ours), 1),
        "bare_first_token_ms": round(1000 * statistics.median(f for _, f in bare), 1),
        "llmkit_first_token_ms": round(1000 * statistics.median(f for _, f in ours), 1),
        "bare_process_s": round(bare_process, 2), "llmkit_process_s": round(llmkit_process, 2),
        "llmkit_help_s": round(help_seconds, 2),
    }
    figures["throughput_ratio"] = round(figures["llmkit_tokens_per_s"] / figures["bare_tokens_per_s"], 3)
    print(f"bare model.generate : {figures['bare_tokens_per_s']:8.1f} tokens/s, first token {figures['bare_first_token_ms']} ms")
    print(f"llmkit generate     : {figures['llmkit_tokens_per_s']:8.1f} tokens/s, first token {figures['llmkit_first_token_ms']} ms")
    print(f"throughput ratio    : {figures['throughput_ratio']:.3f}  (goal >= 0.95)")
    print(f"whole process, 1 token: llmkit {figures['llmkit_process_s']} s, bare transformers script "
          f"{figures['bare_process_s']} s; `llmkit --help` {figures['llmkit_help_s']} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
