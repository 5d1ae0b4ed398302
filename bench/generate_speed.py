"""Generation speed: transformers against the CTranslate2 engine (llmkit.engines), and llmkit's own overhead.

1. Engines, batch 1, greedy, exactly --tokens new tokens in every arm (min_new_tokens = max_new_tokens: no
   early end), each arm through the same call (model.generate with llmkit.generation's arguments), rounds
   interleaved so that noise hits every arm alike: tokens/s (median and spread), x HF, and whether the
   tokens are HF's. Arms: HF fp32, ct2 float32, ct2 int8. Models: the quickstart model (--model; without a
   trained one, a random model of its shape) and a random ~90M Llama (12 layers x 768, its tokenizer).
2. What int8 costs: perplexity of the trained quickstart model as the eval-ppl recipe scores it (the built-in
   corpus's held-out part), transformers fp32 against ct2 int8 (and ct2 float32, which should match).
3. llmkit generate against a bare model.generate (goal: >= 0.95 x its throughput) on a random model of the
   quickstart shape (which does not end early: both stop at max tokens), and the start-up of a whole process.

Goals (issue 16): quickstart >= 4 x HF; ~90M >= 1.2 x HF in float32 and >= 2.5 x in int8.

    taskset -c 0 python bench/generate_speed.py --threads 1 [--model runs/pretrain-zh-tiny] [--tokens 200] [--rounds 5]

On a shared machine, pin it to one core (taskset) with --threads 1: both engines then use one thread.
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

from llmkit.console import quiet_libraries
from llmkit.engines import Ct2Model, export_ct2
from llmkit.generation import encode_prompts, generate_text, generation_kwargs
from llmkit.loading import load_model
from llmkit.settings import GenerateSettings

PROMPT = "昨天天气很"
BIG = ["model.n_layer=12", "model.d_model=768", "model.n_head=12", "model.d_ff=2048"]  # ~89M parameters


def random_model(folder: Path, overrides: list[str], tokenizer=None) -> Path:
    """A random model of the quickstart recipe's architecture (with `overrides`) and a char tokenizer."""
    from llmkit import load_recipe
    from llmkit.corpora import peoples_daily
    from llmkit.loading import build_model
    from llmkit.tokenizer import train_tokenizer

    recipe = load_recipe("pretrain-zh-tiny", overrides)
    if tokenizer is None:
        tokenizer = train_tokenizer([row["text"] for row in peoples_daily()], recipe.tokenizer, "causal")
    torch.manual_seed(0)
    build_model(recipe, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def timed_generate(model, tokenizer, tokens: int) -> tuple[float, list[int]]:
    """(seconds, new ids) of exactly `tokens` greedy new tokens, the same call for either engine."""
    settings = GenerateSettings(greedy=True, max_new_tokens=tokens, repetition_penalty=1.0)
    kwargs = generation_kwargs(settings, tokenizer, model) | {"min_new_tokens": tokens}
    inputs = encode_prompts(tokenizer, [PROMPT], model.device, model=model)
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - start
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new) == tokens, f"{len(new)} new tokens, not {tokens}"
    return seconds, new


def compare_engines(source: Path, scratch: Path, tokens: int, rounds: int, threads: int) -> list[dict]:
    """One row per arm: tokens/s (median, min, max), x HF, same tokens as HF."""
    arms = {"HF fp32": load_model(str(source))}
    for quantization in ("float32", "int8"):
        folder = scratch / f"{source.name}-ct2-{quantization}"
        export_ct2(str(source), folder, quantization)
        arms[f"ct2 {quantization}"] = Ct2Model.load(folder, threads=threads)
    for model, tokenizer in arms.values():
        timed_generate(model, tokenizer, 8)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    ids: dict[str, list[int]] = {}
    for _ in range(rounds):
        for name, (model, tokenizer) in arms.items():
            took, ids[name] = timed_generate(model, tokenizer, tokens)
            seconds[name].append(took)
    hf = statistics.median(tokens / s for s in seconds["HF fp32"])
    rows = []
    for name in arms:
        rates = [tokens / s for s in seconds[name]]
        same = sum(a == b for a, b in zip(ids[name], ids["HF fp32"]))
        rows.append({"arm": name, "tokens_per_s": round(statistics.median(rates), 1),
                     "min": round(min(rates), 1), "max": round(max(rates), 1),
                     "x_hf": round(statistics.median(rates) / hf, 2), "same_tokens": f"{same}/{tokens}"})
    return rows


def perplexity_cost(source: Path, scratch: Path, threads: int) -> list[dict]:
    """Perplexity as the eval-ppl recipe scores it (the built-in corpus's held-out part, the quickstart
    model's context): transformers fp32, ct2 float32, ct2 int8."""
    from llmkit import load_recipe
    from llmkit.task_data import score, task_rows

    task = load_recipe("eval-ppl").eval.tasks[0]
    rows = task_rows(task)
    arms = {"HF fp32": load_model(str(source))}
    for quantization in ("float32", "int8"):
        arms[f"ct2 {quantization}"] = Ct2Model.load(scratch / f"{source.name}-ct2-{quantization}", threads=threads)
    return [{"arm": name, "perplexity": round(score(model, tokenizer, task, rows, 16)["perplexity"], 3)}
            for name, (model, tokenizer) in arms.items()]


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[column]) for column in columns) + " |")


# ---------------------------------------------------------------- llmkit's own overhead


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


def overhead(source: Path, tokens: int, rounds: int) -> dict:
    model, tokenizer = load_model(str(source))
    bare, ours = [], []
    bare_generate(model, tokenizer, 8)  # warm-up
    for _ in range(rounds):
        bare.append(bare_generate(model, tokenizer, tokens))
        ours.append(llmkit_generate(model, tokenizer, tokens))
    bare_script = ("import sys, transformers as t; m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
                   "k = t.AutoTokenizer.from_pretrained(sys.argv[1]); "
                   f"m.generate(**k('{PROMPT}', return_tensors='pt'), max_new_tokens=1)")
    bare_process = statistics.median(process_seconds([sys.executable, "-c", bare_script, str(source)])
                                     for _ in range(3))
    llmkit_process = statistics.median(process_seconds([sys.executable, "-m", "llmkit", "generate", "--model",
                                                        str(source), "--engine", "hf", "--prompt", PROMPT,
                                                        "--max-new-tokens", "1"]) for _ in range(3))
    help_seconds = statistics.median(process_seconds([sys.executable, "-m", "llmkit", "--help"]) for _ in range(3))
    figures = {
        "bare_tokens_per_s": round(statistics.median(r for r, _ in bare), 1),
        "llmkit_tokens_per_s": round(statistics.median(r for r, _ in ours), 1),
        "bare_first_token_ms": round(1000 * statistics.median(f for _, f in bare), 1),
        "llmkit_first_token_ms": round(1000 * statistics.median(f for _, f in ours), 1),
        "bare_process_s": round(bare_process, 2), "llmkit_process_s": round(llmkit_process, 2),
        "llmkit_help_s": round(help_seconds, 2),
    }
    figures["throughput_ratio"] = round(figures["llmkit_tokens_per_s"] / figures["bare_tokens_per_s"], 3)
    print(f"\nbare model.generate : {figures['bare_tokens_per_s']:8.1f} tokens/s, first token "
          f"{figures['bare_first_token_ms']} ms")
    print(f"llmkit generate     : {figures['llmkit_tokens_per_s']:8.1f} tokens/s, first token "
          f"{figures['llmkit_first_token_ms']} ms")
    print(f"throughput ratio    : {figures['throughput_ratio']:.3f}  (goal >= 0.95)")
    print(f"whole process, 1 token: llmkit {figures['llmkit_process_s']} s, bare transformers script "
          f"{figures['bare_process_s']} s; `llmkit --help` {figures['llmkit_help_s']} s")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/pretrain-zh-tiny")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads of both engines (0: default)")
    options = parser.parse_args()
    quiet_libraries()
    if options.threads:
        torch.set_num_threads(options.threads)

    figures: dict = {"model": options.model, "new_tokens": options.tokens, "rounds": options.rounds,
                     "threads": options.threads or torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        source = Path(options.model)
        trained = (source / "config.json").exists()
        if not trained:
            print(f"{source} has no model: using a random model of the quickstart architecture, and no perplexity")
            source = random_model(scratch / "quickstart", [])
        figures["quickstart"] = compare_engines(source, scratch, options.tokens, options.rounds, options.threads)
        print_table(f"quickstart model ({source}), batch 1, greedy, {options.tokens} new tokens, "
                    f"median of {options.rounds} interleaved rounds", figures["quickstart"])
        if trained:
            figures["perplexity"] = perplexity_cost(source, scratch, options.threads)
            print_table("perplexity (recipe eval-ppl: peoples-daily held out, context 128)", figures["perplexity"])
        _, tokenizer = load_model(str(source))
        shaped = random_model(scratch / "quickstart-random", [], tokenizer) if trained else source
        big = random_model(scratch / "llama-90m", BIG, tokenizer)
        parameters = sum(p.numel() for p in load_model(str(big))[0].parameters())
        figures["llama_90m"] = compare_engines(big, scratch, options.tokens, options.rounds, options.threads)
        print_table(f"random Llama, {parameters / 1e6:.0f}M parameters (12 layers x 768, d_ff 2048)", figures["llama_90m"])
        figures["overhead"] = overhead(shaped, options.tokens, options.rounds)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
