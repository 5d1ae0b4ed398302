"""A time budget for training (train.max_minutes): how many optimizer steps fit on this machine.

A recipe written in steps takes twice as long on one laptop as on another (an AVX2-only CPU trains in
fp32, one with avx512_bf16 or AMX in bf16, a GPU faster still). A budget in minutes makes the same recipe
right on each: a few real steps, on a copy of the model and with the run's own batches and precision,
measure the time of one; the run then takes as many steps as fit (train.max_steps stays a ceiling), and
its learning-rate schedule is laid out over exactly those. The count is fixed from then on: the run's
recipe.toml records it, so that a resumed run continues the same schedule (train.max_steps still caps it),
and every rank of a distributed run takes rank 0's count.
"""

from __future__ import annotations

import time

from llmkit.distributed import whole_copy
from llmkit.settings import TrainSettings

WARMUP_STEPS = 2  # not timed: the first steps allocate and pick kernels
TIMED_STEPS = 6


def steps_within(minutes: float, seconds_per_step: float, ceiling: int) -> int:
    """Optimizer steps that fit in `minutes`, at least one, at most `ceiling`."""
    return max(1, min(ceiling, int(minutes * 60 / seconds_per_step)))


def seconds_per_step(model, batches, train: TrainSettings, dtype, device: str, steps: int = TIMED_STEPS) -> float:
    """The time of one optimizer step (train.gradient_accumulation micro-batches from `batches`, an
    iterable of model inputs), the mean of `steps` after WARMUP_STEPS, measured on a copy of `model` (its
    weights stay untouched) with AdamW, gradient clipping and autocast to `dtype` (torch.float32: none) as
    the Trainer trains (which adds a few percent: logging, callbacks)."""
    import torch

    probe = whole_copy(model).to(device).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=train.learning_rate, betas=(0.9, train.adam_beta2),
                                  weight_decay=train.weight_decay)
    micro_batches = iter(endless(batches))
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            synchronize(device)
            start = time.perf_counter()
        for _ in range(train.gradient_accumulation):
            inputs = {key: value.to(device) for key, value in next(micro_batches).items()}
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                loss = probe(**inputs).loss
            (loss / train.gradient_accumulation).backward()
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(probe.parameters(), train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def endless(batches):
    """`batches` over and over (a small data set may hold fewer batches than the measurement takes)."""
    while True:
        yield from batches


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
