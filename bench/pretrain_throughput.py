"""Training throughput of `llmkit pretrain` against a plain PyTorch loop, in one run.

Both train the quickstart model (recipes/pretrain-zh-tiny.toml) on the same packed blocks with the
same batch size, optimizer and schedule, for the same number of steps; they alternate (plain, llmkit,
plain, llmkit, ...) so that machine noise hits both. Goal: llmkit >= 0.95 x the plain loop.

    python bench/pretrain_throughput.py [--steps 60] [--rounds 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

from llmkit import load_recipe, pretrain
from llmkit.builders import build_model
from llmkit.data import load_text_splits, pack_blocks
from llmkit.rundir import read_jsonl
from llmkit.tokenizer import load_tokenizer


WARMUP_STEPS = 10  # both sides are timed from the end of this step to the end of the last (steady state)


class StepClock(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP_STEPS:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def llmkit_tokens_per_second(recipe, workdir: Path, round_index: int) -> tuple[float, float]:
    """(steady-state tokens/s, tokens/s over Trainer's whole train_runtime, start-up included)."""
    recipe.run.output_dir = str(workdir)
    recipe.run.name = f"llmkit-{round_index}"
    clock = StepClock()
    result = pretrain.run(recipe, callbacks=[clock])
    summary = next(row for row in read_jsonl(result.run_dir / "metrics.jsonl") if "train_runtime" in row)
    steady = tokens_per_step(recipe) * (recipe.train.max_steps - WARMUP_STEPS) / (clock.end - clock.start)
    return steady, tokens_per_step(recipe) * recipe.train.max_steps / summary["train_runtime"]


def plain_tokens_per_second(recipe, tokenizer, blocks) -> float:
    """The textbook loop: fused AdamW (Trainer's default), warm-up + cosine, gradient clipping, shuffled batches."""
    transformers.set_seed(recipe.run.seed)
    model = build_model(recipe, tokenizer).train()
    train = recipe.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train.learning_rate, betas=(0.9, train.adam_beta2), fused=True)
    schedule = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, int(train.warmup_steps * train.max_steps), train.max_steps, min_lr_rate=train.min_lr_ratio)
    data = torch.tensor(blocks["input_ids"], dtype=torch.long)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(recipe.run.seed))
    for step in range(train.max_steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        batch = data[order[(torch.arange(train.batch_size) + step * train.batch_size) % len(data)]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % train.log_every == 0:
            loss.item()  # what any loop that logs pays too
    return tokens_per_step(recipe) * (train.max_steps - WARMUP_STEPS) / (time.perf_counter() - start)


def tokens_per_step(recipe) -> int:
    return recipe.data.block_size * recipe.train.batch_size * recipe.train.gradient_accumulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    options = parser.parse_args()
    overrides = [f"train.max_steps={options.steps}", f"train.eval_every={10 * options.steps}",
                 f"train.save_every={10 * options.steps}", "generate.prompts=[]", *options.sets]

    with tempfile.TemporaryDirectory() as workdir:
        llmkit_rates, plain_rates = [], []
        for round_index in range(options.rounds):
            recipe = load_recipe("pretrain-zh-tiny", overrides)
            if round_index == 0:  # the first llmkit run trains the tokenizer; reuse it for the plain loop
                llmkit_rates.append(llmkit_tokens_per_second(recipe, Path(workdir), round_index))
                tokenizer = load_tokenizer(str(Path(workdir) / "llmkit-0"))
                blocks, _ = pack_blocks(load_text_splits(recipe.data).train, tokenizer, recipe.data.block_size)
                plain_rates.append(plain_tokens_per_second(recipe, tokenizer, blocks))
            else:
                plain_rates.append(plain_tokens_per_second(recipe, tokenizer, blocks))
                llmkit_rates.append(llmkit_tokens_per_second(load_recipe("pretrain-zh-tiny", overrides),
                                                             Path(workdir), round_index))
    llmkit_rate = statistics.median(steady for steady, _ in llmkit_rates)
    whole_rate = statistics.median(whole for _, whole in llmkit_rates)
    plain_rate = statistics.median(plain_rates)
    figures = {"steps": options.steps, "rounds": options.rounds, "threads": torch.get_num_threads(),
               "llmkit_tokens_per_s": round(llmkit_rate), "plain_tokens_per_s": round(plain_rate),
               "ratio": round(llmkit_rate / plain_rate, 3),
               "llmkit_whole_train_runtime_tokens_per_s": round(whole_rate),
               "ratio_whole_train_runtime": round(whole_rate / plain_rate, 3),
               "llmkit_each": [round(r) for r, _ in llmkit_rates], "plain_each": [round(r) for r in plain_rates]}
    print(f"llmkit pretrain : {llmkit_rate:10,.0f} tokens/s  (each round: {figures['llmkit_each']})")
    print(f"plain PyTorch   : {plain_rate:10,.0f} tokens/s  (each round: {figures['plain_each']})")
    print(f"ratio           : {figures['ratio']:.3f}  (goal >= 0.95; steady state after {WARMUP_STEPS} steps)")
    print(f"ratio, Trainer's whole train_runtime (start-up included): {figures['ratio_whole_train_runtime']:.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
