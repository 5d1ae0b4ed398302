"""Dynamic batching for the server: requests wait in a bounded queue, and one worker thread takes the
oldest with every waiting request it can share a `model.generate` call with (same settings, no seed of
its own), up to a batch size.

    batcher = Batcher(model, tokenizer, max_queue=64, max_batch=16)
    batcher.start()
    batcher.submit([Job("今天", settings, emit=print)])   # emit(Piece | Finished | Failed), from the worker
    batcher.stop()

A job streams its text as it is made (Piece events, never past a stop string) when asked, and always ends
with one Finished (the continuations, their token counts and why each ended) or one Failed. A job given up
(client gone, deadline passed) stops generating at the next token without holding back the others.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from llmkit.generation import (StopStreamer, count_new_tokens, cut_at_stop, encode_prompts, run_generate,
                               seed_everything)
from llmkit.settings import GenerateSettings


class QueueFull(Exception):
    """More requests wait than the queue holds (the server answers 429)."""


class TimedOut(Exception):
    """A request was not done by its deadline (the server answers 504)."""


@dataclass
class Piece:
    choice: int  # which of the job's num_return_sequences continuations
    text: str


@dataclass
class Choice:
    text: str
    tokens: int
    finish_reason: str  # "stop": an end token or a stop string; "length": max_new_tokens reached


@dataclass
class Finished:
    choices: list[Choice]


@dataclass
class Failed:
    error: Exception


@dataclass(eq=False)
class Job:
    prompt: str
    settings: GenerateSettings
    emit: Callable[[Piece | Finished | Failed], object]  # called from the worker thread
    add_special_tokens: bool = True  # False for chat prompts: the template holds the special tokens
    seed: int | None = None
    stream: bool = False
    deadline: float = float("inf")  # time.monotonic() by which it must be done
    cancelled: bool = False

    def key(self) -> tuple:
        """Jobs with equal keys can share one generate call. A seeded job runs alone: its text must not
        depend on what else was waiting."""
        settings = self.settings
        alone = id(self) if self.seed is not None else None
        return (settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                settings.repetition_penalty, settings.greedy, settings.num_return_sequences, tuple(settings.stop),
                self.add_special_tokens, alone)

    def given_up(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline


@dataclass
class BatchStats:
    batches: int = 0  # generate calls
    requests: int = 0  # jobs done
    batched_requests: int = 0  # jobs that shared their generate call with others
    largest_batch: int = 0


class Batcher:
    """The queue and its worker thread (see the module's docstring)."""

    def __init__(self, model, tokenizer, max_queue: int = 64, max_batch: int = 16, gather: float = 0.02) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.max_batch = max_queue, max_batch
        # Seconds to wait for more requests before a batch smaller than the demand starts. The clients of a
        # batch that just ended send their next requests a few ms apart: without the wait the first would
        # start alone and the others wait a whole generation behind it. One client alone never waits.
        self.gather = gather
        self.demand = 0  # requests in flight lately: generating or waiting, at the last submit or take
        self.waiting: deque[Job] = deque()
        self.changed = threading.Condition()
        self.running = False
        self.busy = 0  # jobs in the current generate call
        self.stats = BatchStats()
        # The server counts prompts' tokens in its own thread, with a tokenizer of its own: a fast tokenizer
        # keeps its padding setting in its Rust half, so a batch padded here while another thread encodes
        # with the same one comes out unpadded, or either call fails ("Already borrowed").
        self.counting = copy.deepcopy(tokenizer)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self.work, name="llmkit-batcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Finish the batch in progress; jobs still waiting fail."""
        with self.changed:
            self.running = False
            self.changed.notify_all()
        if self.thread is not None:
            self.thread.join()
        while self.waiting:
            self.waiting.popleft().emit(Failed(RuntimeError("the server is shutting down")))

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request, all or none (QueueFull)."""
        with self.changed:
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most the queue holds is "
                                f"{self.max_queue}: try again later")
            self.waiting.extend(jobs)
            self.demand = max(self.demand, self.busy + len(self.waiting))
            self.changed.notify()

    def count_tokens(self, text: str, add_special_tokens: bool = True) -> int:
        """The tokens of a prompt, from one thread other than the worker's (the server's)."""
        return len(self.counting(text, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def work(self) -> None:
        while True:
            batch = self.take()
            if batch is None:
                return
            try:
                self.generate(batch)
            except Exception as error:  # noqa: BLE001 - a failed batch fails its requests, not the server
                for job in batch:
                    job.emit(Failed(error))
            self.busy = 0

    def take(self) -> list[Job] | None:
        """The oldest waiting job and the waiting jobs that can join it (after `gather` seconds at most for
        as many as the demand); None once stopped."""
        with self.changed:
            while self.running:
                self.drop_given_up()
                if not self.waiting:
                    self.changed.wait()
                    continue
                gathered = time.monotonic() + self.gather
                while self.running and len(self.waiting) < min(self.demand, self.max_batch) \
                        and time.monotonic() < gathered:
                    self.changed.wait(gathered - time.monotonic())
                self.drop_given_up()
                if self.waiting:
                    key = self.waiting[0].key()
                    batch = [job for job in self.waiting if job.key() == key][:self.max_batch]
                    for job in batch:
                        self.waiting.remove(job)
                    self.busy, self.demand = len(batch), len(batch) + len(self.waiting)
                    return batch
            return None

    def drop_given_up(self) -> None:
        for job in [job for job in self.waiting if job.given_up()]:
            self.waiting.remove(job)
            job.emit(Failed(TimedOut("the request was not started before its deadline (--timeout)")))

    def generate(self, batch: list[Job]) -> None:
        settings, n = batch[0].settings, batch[0].settings.num_return_sequences
        rows = [(job, choice) for job in batch for choice in range(n)]  # generate's output rows: n per prompt
        streamers = [StopStreamer(self.tokenizer, lambda text, job=job, choice=choice: job.emit(Piece(choice, text)),
                                  settings.stop) if job.stream else None for job, choice in rows]
        seed_everything(batch[0].seed)
        inputs = encode_prompts(self.tokenizer, [job.prompt for job in batch], self.model.device,
                                batch[0].add_special_tokens, self.model)
        new_ids, _, _ = run_generate(self.model, self.tokenizer, inputs, settings, RowStreamer(streamers),
                                     stopping=(give_up_criterion([job for job, _ in rows]),))
        self.count(batch)
        for number, job in enumerate(batch):
            if job.given_up() and not job.cancelled:
                job.emit(Failed(TimedOut("the request was not done before its deadline (--timeout)")))
            else:
                job.emit(Finished([self.choice(row, settings) for row in new_ids[number * n:(number + 1) * n]]))

    def choice(self, row, settings: GenerateSettings) -> Choice:
        text, stopped = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), settings.stop)
        tokens = count_new_tokens(row[None], self.tokenizer)
        ended = stopped or tokens < settings.max_new_tokens or row[tokens - 1].item() in self.end_ids()
        return Choice(text, tokens, "stop" if ended else "length")

    def end_ids(self) -> set[int]:
        config = getattr(self.model, "generation_config", None)
        ids = config.eos_token_id if config is not None and config.eos_token_id is not None \
            else self.tokenizer.eos_token_id
        return set(ids) if isinstance(ids, list) else {ids}

    def count(self, batch: list[Job]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.requests += len(batch)
        stats.batched_requests += len(batch) if len(batch) > 1 else 0
        stats.largest_batch = max(stats.largest_batch, len(batch))


class RowStreamer:
    """A transformers streamer for a batch: each generated row's tokens go to that row's own streamer
    (None: not streamed)."""

    def __init__(self, streamers: list) -> None:
        self.streamers = streamers
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompts: each row's streamer skips it too
            self.prompt_seen = True
            tokens = [value] * len(self.streamers)
        else:
            tokens = value.reshape(len(self.streamers), -1)
        for streamer, token in zip(self.streamers, tokens):
            if streamer is not None:
                streamer.put(token)

    def put_row(self, row: int, token) -> None:
        """One row's token (the ct2 engine gives them so, llmkit.engines.Watcher)."""
        if self.streamers[row] is not None:
            self.streamers[row].put(token)

    def end(self) -> None:
        for streamer in self.streamers:
            if streamer is not None:
                streamer.end()


def give_up_criterion(rows: list[Job]):
    """Ends the rows of jobs given up (cancelled, or past their deadline); the others go on. Called with
    the whole batch (transformers), or one row named by `row` (the ct2 engine)."""
    import torch
    from transformers import StoppingCriteria

    class GiveUp(StoppingCriteria):
        def __call__(self, input_ids, scores, row: int | None = None, **kwargs):
            asked = rows if row is None else [rows[row]]
            return torch.tensor([job.given_up() for job in asked], device=input_ids.device)

    return GiveUp()
