"""Training throughput of `llmkit pretrain` against a plain PyTorch loop, per precision, in one run.

Both train the quickstart model (recipes/pretrain-zh-tiny.toml) on the same packed blocks with the same
batch size, optimizer and schedule, for the same number of steps, on the same device and in the same
precision (bf16: mixed precision, torch.autocast, in both); they alternate (plain, llmkit, plain, llmkit,
...) so that machine noise hits both. fp32 always; bf16 too where this CPU computes in it natively (or
with --precisions). Also printed: llmkit's validation loss per char after those steps in each
precision (is bf16 as good?), and what `train.precision = "auto"` picks here, and why.

    python bench/pretrain_throughput.py [--steps 100] [--rounds 2] [--precisions fp32,bf16] [--set KEY=VALUE ...]
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
from llmkit.data import load_text_splits, pack_blocks
from llmkit.devices import cpu_bf16_features, pick_device, training_precision
from llmkit.loading import build_model
from llmkit.tokenizer import load_tokenizer

WARMUP_STEPS = 10  # both sides are timed from the end of this step to the end of the last (steady state)


class StepClock(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP_STEPS:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def llmkit_run(recipe, workdir: Path, name: str) -> tuple[float, float]:
    """(steady-state tokens/s, validation loss per char after the run)."""
    recipe.run.output_dir, recipe.run.name = str(workdir), name
    clock = StepClock()
    result = pretrain.run(recipe, callbacks=[clock])
    rate = tokens_per_step(recipe) * (recipe.train.max_steps - WARMUP_STEPS) / (clock.end - clock.start)
    return rate, result.metrics["eval_loss_per_char"]


def plain_tokens_per_second(recipe, tokenizer, blocks, precision: str) -> float:
    """The textbook loop on llmkit's device: fused AdamW (Trainer's default), warm-up + cosine, gradient
    clipping, shuffled batches; bf16 as Trainer does it (autocast around the forward pass)."""
    transformers.set_seed(recipe.run.seed)
    device = pick_device("auto")
    model = build_model(recipe, tokenizer).to(device).train()
    train = recipe.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train.learning_rate, betas=(0.9, train.adam_beta2), fused=True)
    schedule = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, int(train.warmup_steps * train.max_steps), train.max_steps, min_lr_rate=train.min_lr_ratio)
    data = torch.tensor(blocks["input_ids"], dtype=torch.long, device=device)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(recipe.run.seed)).to(device)
    for step in range(train.max_steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        batch = data[order[(torch.arange(train.batch_size, device=device) + step * train.batch_size) % len(data)]]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
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
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", default=None,
                        help="comma-separated (default: fp32, and bf16 where this CPU has it natively)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    options = parser.parse_args()
    precisions = (options.precisions.split(",") if options.precisions
                  else ["fp32", "bf16"] if cpu_bf16_features() or torch.cuda.is_available() else ["fp32"])
    overrides = [f"train.max_steps={options.steps}", f"train.eval_every={10 * options.steps}",
                 f"train.save_every={10 * options.steps}", "generate.prompts=[]", *options.sets]

    def recipe_in(precision: str):
        return load_recipe("pretrain-zh-tiny", [*overrides, f"train.precision={precision}"])

    llmkit_rates = {p: [] for p in precisions}
    plain_rates = {p: [] for p in precisions}
    loss_per_char = {}
    with tempfile.TemporaryDirectory() as workdir:
        # The first run trains the tokenizer; the plain loop reuses it and its packed blocks.
        rate, loss_per_char[precisions[0]] = llmkit_run(recipe_in(precisions[0]), Path(workdir), "first")
        llmkit_rates[precisions[0]].append(rate)
        tokenizer = load_tokenizer(str(Path(workdir) / "first"))
        data = recipe_in("fp32").data
        blocks, _ = pack_blocks(load_text_splits(data).train, tokenizer, data.block_size)
        for round_index in range(options.rounds):
            for precision in precisions:
                plain_rates[precision].append(plain_tokens_per_second(recipe_in(precision), tokenizer, blocks,
                                                                      precision))
                if len(llmkit_rates[precision]) <= round_index:
                    rate, loss_per_char[precision] = llmkit_run(recipe_in(precision), Path(workdir),
                                                                f"{precision}-{round_index}")
                    llmkit_rates[precision].append(rate)
    auto = training_precision("auto")
    rows = {p: {"llmkit_tokens_per_s": round(statistics.median(llmkit_rates[p])),
                "plain_tokens_per_s": round(statistics.median(plain_rates[p])),
                "ratio": round(statistics.median(llmkit_rates[p]) / statistics.median(plain_rates[p]), 3),
                "ratio_each_round": [round(a / b, 3) for a, b in zip(llmkit_rates[p], plain_rates[p])],
                "loss_per_char": round(loss_per_char[p], 4)} for p in precisions}
    print(f"{options.steps} steps of the quickstart model, {options.rounds} rounds, {torch.get_num_threads()} threads; "
          f"steady state after {WARMUP_STEPS} steps")
    print(f"{'precision':10} {'llmkit tok/s':>13} {'plain tok/s':>12} {'llmkit/plain':>13} {'loss/char':>10}")
    for p, row in rows.items():
        print(f"{p:10} {row['llmkit_tokens_per_s']:13,} {row['plain_tokens_per_s']:12,} {row['ratio']:13.3f} "
              f"{row['loss_per_char']:10.4f}")
    if "bf16" in rows and "fp32" in rows:
        speedup = rows["bf16"]["llmkit_tokens_per_s"] / rows["fp32"]["llmkit_tokens_per_s"]
        print(f"bf16 / fp32 (llmkit): {speedup:.2f}x the speed, loss/char "
              f"{rows['bf16']['loss_per_char'] - rows['fp32']['loss_per_char']:+.4f}")
    print(f'auto here: {auto.name} ({auto.reason})')
    print(json.dumps({"steps": options.steps, "rounds": options.rounds, "threads": torch.get_num_threads(),
                      "auto": {"precision": auto.name, "reason": auto.reason}, "precisions": rows}))


if __name__ == "__main__":
    main()
