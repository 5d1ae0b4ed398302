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

ContinuousBatcher (transformers models) hands the jobs it can to transformers' continuous batching
instead: a job joins the running batch at the next step and leaves it when it ends, so nobody waits for
a whole batch to end. The others (a seed, n > 1, a repetition penalty, sampling settings other than the
server's) still go through the queue above.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from llmkit.generation import (StopStreamer, count_new_tokens, cut_at_stop, encode_prompts, run_generate,
                               seed_everything, with_model_defaults)
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
    continuous_requests: int = 0  # jobs done by continuous batching (ContinuousBatcher)


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

    @property
    def generating(self) -> int:
        return self.busy

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


@dataclass
class Follower:
    """A job in transformers' continuous batching: its tokens so far, and the streamer that watches them
    for stop strings (and streams them when the job asked)."""

    job: Job
    streamer: StopStreamer
    tokens: list[int] = field(default_factory=list)


class ContinuousBatcher(Batcher):
    """A Batcher whose jobs go to transformers' continuous batching (`model.init_continuous_batching`: a
    paged KV cache, requests joining and leaving the running batch at each step) where it generates as
    `model.generate` would (see `continuous`). The others go through Batcher's queue, and are generated
    while the continuous loop is paused."""

    PAGE = 32  # tokens in a page of the paged KV cache

    def __init__(self, model, tokenizer, max_queue: int = 64, max_batch: int = 16, gather: float = 0.02,
                 defaults: GenerateSettings | None = None, positions: int | None = None) -> None:
        super().__init__(model, tokenizer, max_queue, max_batch, gather)
        # The server's sampling settings: the manager's, one set for all its requests. Transformers can take
        # temperature, top_k and top_p per request too, but then sorts the whole vocabulary twice a step:
        # on a CPU that halved the tokens/s of 16 requests sampling together.
        self.defaults = with_model_defaults(defaults or GenerateSettings(), model)
        self.positions = positions or 2048
        self.live: dict[str, Follower] = {}  # by request id
        self.manager = None
        self.reading = False
        self.reader: threading.Thread | None = None

    def start(self) -> None:
        self.manager = self.model.init_continuous_batching(generation_config=self.generation_config(),
                                                           continuous_batching_config=self.cache_config())
        self.manager.start()
        self.reading = True
        self.reader = threading.Thread(target=self.read, name="llmkit-continuous", daemon=True)
        self.reader.start()
        super().start()

    def generation_config(self):
        from transformers import GenerationConfig

        return GenerationConfig(**self.sampling(self.defaults), eos_token_id=list(self.end_ids()),
                                pad_token_id=self.tokenizer.pad_token_id)

    @staticmethod
    def sampling(settings: GenerateSettings) -> dict:
        """What picks a job's next token: greedy, or sampling with its temperature, top_k and top_p."""
        if not settings.sampling:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": settings.temperature, "top_k": settings.top_k,
                "top_p": settings.top_p}

    def cache_config(self):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        # Sized for max_batch requests of the model's full length. Left unset, transformers sizes the cache
        # from the accelerator's free memory: on a CPU it took 11 GB for the 1M-parameter quickstart model.
        pages = -(-self.positions // self.PAGE)
        return ContinuousBatchingConfig(page_size=self.PAGE, num_blocks=self.max_batch * pages,
                                        max_batch_tokens=max(self.positions, 256),
                                        max_requests_per_batch=self.max_batch, allow_block_sharing=False)

    def stop(self) -> None:
        super().stop()
        self.manager.stop(block=True)  # the requests in it finish first
        self.reading = False
        self.reader.join()
        for request_id in list(self.live):
            self.live.pop(request_id).job.emit(Failed(RuntimeError("the server is shutting down")))

    def continuous(self, job: Job) -> bool:
        """Whether transformers' continuous batching generates this job as `model.generate` would. Not: a
        seed (the manager's random numbers are shared by every request, so the text would not repeat), n > 1
        (the manager's num_return_sequences is one for all), a repetition penalty (transformers drops it
        there: it needs each sequence's past tokens), or sampling settings other than the server's (the
        manager's, see __init__)."""
        settings = with_model_defaults(job.settings, self.model)
        return (job.seed is None and settings.num_return_sequences == 1 and settings.num_beams == 1
                and settings.repetition_penalty == 1.0 and self.sampling(settings) == self.sampling(self.defaults))

    def submit(self, jobs: list[Job]) -> None:
        if not all(self.continuous(job) for job in jobs):
            return super().submit(jobs)
        with self.changed:
            if self.queued + max(0, min(len(jobs), len(self.live) + len(jobs) - self.max_batch)) > self.max_queue:
                raise QueueFull(f"{self.queued} requests are waiting, the most the queue holds is {self.max_queue}: "
                                "try again later")
            for job in jobs:
                self.add(job)

    def add(self, job: Job) -> None:
        emit = (lambda text: job.emit(Piece(0, text))) if job.stream else (lambda text: None)
        follower = Follower(job, StopStreamer(self.tokenizer, emit, job.settings.stop))
        request_id = uuid.uuid4().hex
        self.live[request_id] = follower  # before the manager can answer
        ids = self.counting(job.prompt, add_special_tokens=job.add_special_tokens)["input_ids"]
        self.manager.add_request(ids, request_id=request_id, max_new_tokens=job.settings.max_new_tokens,
                                 streaming=True)

    @property
    def queued(self) -> int:
        return len(self.waiting) + max(0, len(self.live) - self.max_batch)

    @property
    def generating(self) -> int:
        return self.busy + min(len(self.live), self.max_batch)

    def generate(self, batch: list[Job]) -> None:
        with self.manager.pause():  # one generation at a time on the model; the continuous requests keep their place
            super().generate(batch)

    def read(self) -> None:
        """The manager's outputs to the jobs, and jobs given up out of it, until stopped."""
        while self.reading or not self.manager.output_router.output_queue.empty():
            output = self.manager.get_result(timeout=0.05)
            if output is not None:
                self.follow(output)
            self.drop_given_up_live()

    def follow(self, output) -> None:
        with self.changed:
            follower = self.live.get(output.request_id)
        if follower is None:  # given up already
            return
        new = output.generated_tokens[len(follower.tokens):]
        follower.tokens.extend(new)
        follower.streamer.add(new)
        if follower.streamer.stopped:  # a stop string: the rest would be cut anyway
            self.manager.cancel_request(output.request_id)
        elif not output.is_finished():
            return
        with self.changed:
            self.live.pop(output.request_id, None)
        if output.error is not None:
            follower.job.emit(Failed(RuntimeError(output.error)))
            return
        self.finish(follower)

    def finish(self, follower: Follower) -> None:
        import torch

        follower.streamer.end()
        self.stats.requests += 1
        self.stats.continuous_requests += 1
        row = torch.tensor(follower.tokens, dtype=torch.long)
        follower.job.emit(Finished([self.choice(row, follower.job.settings)]))

    def drop_given_up_live(self) -> None:
        with self.changed:
            given_up = [(request_id, follower) for request_id, follower in self.live.items() if follower.job.given_up()]
            for request_id, _ in given_up:
                del self.live[request_id]
        for request_id, follower in given_up:
            self.manager.cancel_request(request_id)  # frees its place in the batch and its pages
            follower.job.emit(Failed(RuntimeError("the client went away") if follower.job.cancelled
                                     else TimedOut("the request was not done before its deadline (--timeout)")))


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
