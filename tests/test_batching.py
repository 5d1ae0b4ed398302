"""llmkit.batching in process, on a tiny random llama: waiting jobs share a generate call, each gets its own
text (the text it would get alone), streamed pieces add up to it, and jobs given up or over the queue fail."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace

import pytest

from llmkit.batching import Batcher, ContinuousBatcher, Failed, Finished, Job, Piece, QueueFull, TimedOut
from llmkit.settings import GenerateSettings

pytest.importorskip("torch")

from llmkit.generation import generate_text  # noqa: E402
from llmkit.loading import load_model  # noqa: E402
from tests.conftest import char_tokenizer, save_tiny_model, wait_until  # noqa: E402

GREEDY = GenerateSettings(max_new_tokens=8, greedy=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("batching") / "model", "LlamaForCausalLM", char_tokenizer())
    return load_model(str(path))


def jobs_for(prompts: list[str], settings: GenerateSettings = GREEDY, **options) -> list[tuple[Job, list]]:
    made = []
    for prompt in prompts:
        events: list = []
        made.append((Job(prompt, settings, events.append, **options), events))
    return made


def all_ended(made: list[tuple[Job, list]]) -> bool:
    return all(events and isinstance(events[-1], (Finished, Failed)) for _, events in made)


def run(batcher: Batcher, made: list[tuple[Job, list]]) -> list:
    """Submit before the worker starts (so they all wait together), then each job's last event."""
    batcher.submit([job for job, _ in made])
    batcher.start()
    wait_until(lambda: all_ended(made))
    batcher.stop()
    return [events[-1] for _, events in made]


def test_jobs_that_can_share_a_call_have_one_key():
    one, other = (job for job, _ in jobs_for(["今天", "明天"]))
    assert one.key() == other.key()
    assert Job("今天", replace(GREEDY, stop=["。"]), print).key() != one.key()
    assert Job("今天", GREEDY, print, add_special_tokens=False).key() != one.key()
    assert Job("今天", GREEDY, print, seed=1).key() != Job("今天", GREEDY, print, seed=1).key()  # seeded: alone


def test_waiting_jobs_run_as_one_batch_each_with_its_own_text(tiny):
    model, tokenizer = tiny
    prompts = ["今天", "明天", "我们"]
    made = jobs_for(prompts, stream=True)
    batcher = Batcher(model, tokenizer)
    finished = run(batcher, made)
    assert (batcher.stats.batches, batcher.stats.largest_batch, batcher.stats.batched_requests) == (1, 3, 3)
    for prompt, done, (_, events) in zip(prompts, finished, made):
        own = generate_text(model, tokenizer, prompt, GREEDY).text
        assert [choice.text for choice in done.choices] == [own] and done.choices[0].tokens == 8
        assert done.choices[0].finish_reason == "length"
        assert "".join(event.text for event in events if isinstance(event, Piece)) == own


def test_a_stop_string_ends_with_stop_and_n_gives_n_choices(tiny):
    model, tokenizer = tiny
    full = generate_text(model, tokenizer, "今天", GREEDY).text
    (stopped,) = run(Batcher(model, tokenizer), jobs_for(["今天"], replace(GREEDY, stop=[full[4]])))
    assert stopped.choices[0].text == full[:full.index(full[4])] and stopped.choices[0].finish_reason == "stop"
    sampling = GenerateSettings(max_new_tokens=6, temperature=1.0, num_return_sequences=2)
    (two,) = run(Batcher(model, tokenizer), jobs_for(["今天"], sampling, seed=3))
    assert len(two.choices) == 2 and sum(choice.tokens for choice in two.choices) == 12


def test_a_full_queue_refuses_and_late_jobs_time_out(tiny):
    model, tokenizer = tiny
    batcher = Batcher(model, tokenizer, max_queue=2)
    with pytest.raises(QueueFull, match="the most the queue holds is 2"):
        batcher.submit([job for job, _ in jobs_for(["一", "二", "三"])])
    assert batcher.queued == 0  # all or none
    late = jobs_for(["今天"], deadline=time.monotonic() - 1)
    (failed,) = run(batcher, late)
    assert isinstance(failed, Failed) and isinstance(failed.error, TimedOut)
    assert batcher.stats.batches == 0


def test_stopping_fails_the_jobs_still_waiting(tiny):
    model, tokenizer = tiny
    batcher = Batcher(model, tokenizer)
    made = jobs_for(["今天"])
    batcher.submit([made[0][0]])
    batcher.stop()  # never started
    assert isinstance(made[0][1][-1], Failed) and "shutting down" in str(made[0][1][-1].error)


def test_a_batch_smaller_than_the_demand_waits_for_the_rest(tiny):
    model, tokenizer = tiny
    batcher = Batcher(model, tokenizer, gather=5.0)
    batcher.running = True  # take() as the worker calls it
    start = time.monotonic()
    batcher.submit([job for job, _ in jobs_for(["一"])])
    assert len(batcher.take()) == 1 and time.monotonic() - start < 1  # one client alone never waits
    batcher.busy, batcher.demand = 0, 3  # as after a batch of three, its clients about to send again
    batcher.submit([job for job, _ in jobs_for(["二"])])
    threading.Timer(0.1, lambda: batcher.submit([job for job, _ in jobs_for(["三", "四"])])).start()
    assert len(batcher.take()) == 3 and time.monotonic() - start < 4  # not the whole 5 s: the rest came


def test_counting_tokens_beside_a_batch_being_padded_is_safe(tiny):
    # the server counts a prompt's tokens in its own thread while the worker pads a batch
    model, tokenizer = tiny
    batcher, stop = Batcher(model, tokenizer), threading.Event()

    expected, failures = len(tokenizer("今天天气很好")["input_ids"]), []

    def count() -> None:
        while not stop.is_set():
            try:
                assert batcher.count_tokens("今天天气很好") == expected
            except Exception as error:  # noqa: BLE001 - a failure in this thread is the test's
                failures.append(error)

    counter = threading.Thread(target=count)
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: without the lock this fails within a few batches
    counter.start()
    try:
        for _ in range(30):
            made = jobs_for(["今", "昨天天气很好啊"], replace(GREEDY, max_new_tokens=1))
            batcher.generate([job for job, _ in made])
            assert all(isinstance(events[-1], Finished) for _, events in made)
        assert not failures
    finally:
        stop.set()
        counter.join()
        sys.setswitchinterval(switching)


# ---------------------------------------------------------------- continuous batching (transformers')

PLAIN = replace(GREEDY, repetition_penalty=1.0)  # what continuous batching serves: no repetition penalty


def run_continuous(batcher: ContinuousBatcher, made: list[tuple[Job, list]]) -> list:
    """Start, then submit each job as a request of its own (they go straight to the running batch), then
    each job's last event."""
    batcher.start()
    try:
        for job, _ in made:
            batcher.submit([job])
        wait_until(lambda: all_ended(made))
    finally:
        batcher.stop()
    return [events[-1] for _, events in made]


def test_continuous_batching_gives_each_job_models_generate_greedy_tokens(tiny):
    model, tokenizer = tiny
    prompts, lengths = ["今天", "明天天气很好", "我们"], [3, 12, 7]  # prompts and max_new_tokens differ, together
    made = [(Job(prompt, replace(PLAIN, max_new_tokens=length), events.append, stream=True), events)
            for prompt, length, events in zip(prompts, lengths, ([], [], []))]
    batcher = ContinuousBatcher(model, tokenizer, defaults=PLAIN, positions=128)
    finished = run_continuous(batcher, made)
    assert (batcher.stats.continuous_requests, batcher.stats.batches) == (3, 0)  # no generate call of the queue
    for prompt, length, done, (_, events) in zip(prompts, lengths, finished, made):
        inputs = tokenizer(prompt, return_tensors="pt")
        own = model.generate(**inputs, max_new_tokens=length, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        # the char tokenizer has a token a character: the same text is the same token ids
        assert done.choices[0].text == tokenizer.decode(own, skip_special_tokens=True)
        assert done.choices[0].tokens == len(own) == length and done.choices[0].finish_reason == "length"
        assert "".join(event.text for event in events if isinstance(event, Piece)) == done.choices[0].text


def test_continuous_batching_stops_at_a_stop_string_and_frees_a_cancelled_jobs_place(tiny):
    model, tokenizer = tiny
    full = generate_text(model, tokenizer, "今天", PLAIN).text
    stop = replace(PLAIN, stop=[full[4]])
    batcher = ContinuousBatcher(model, tokenizer, defaults=PLAIN, positions=128, max_batch=1)
    (stopped,) = run_continuous(batcher, jobs_for(["今天"], stop, stream=True))
    assert stopped.choices[0].text == full[:full.index(full[4])] and stopped.choices[0].finish_reason == "stop"

    batcher = ContinuousBatcher(model, tokenizer, defaults=PLAIN, positions=128, max_batch=1)
    batcher.start()
    try:
        (long, long_events), = jobs_for(["长"], replace(PLAIN, max_new_tokens=100), stream=True)
        batcher.submit([long])
        wait_until(lambda: long_events)  # generating
        long.cancelled = True  # the client went away
        wait_until(lambda: isinstance(long_events[-1], Failed))
        scheduler = batcher.manager.batch_processor.scheduler
        wait_until(lambda: not scheduler.active_requests and not scheduler.waiting_requests)
        (after, after_events), = jobs_for(["今天"], PLAIN)  # the one place in the batch is free again
        batcher.submit([after])
        wait_until(lambda: after_events)
        assert isinstance(after_events[-1], Finished) and after_events[-1].choices[0].tokens == 8
        assert not batcher.live
    finally:
        batcher.stop()


def test_jobs_continuous_batching_cannot_serve_go_through_the_queue(tiny):
    model, tokenizer = tiny
    batcher = ContinuousBatcher(model, tokenizer, defaults=PLAIN, positions=128)
    seeded, penalized, sampled = (Job("今天", PLAIN, print, seed=1), Job("今天", GREEDY, print),
                                  Job("今天", replace(PLAIN, greedy=False, temperature=0.7), print))
    assert batcher.continuous(Job("今天", PLAIN, print))
    assert not any(batcher.continuous(job) for job in (seeded, penalized, sampled))
    made = jobs_for(["今天", "明天"], GREEDY)  # the repetition penalty: the queue's generate call
    finished = run_continuous(batcher, made)
    assert (batcher.stats.batches, batcher.stats.continuous_requests) == (1, 0)
    assert finished[0].choices[0].text == generate_text(model, tokenizer, "今天", GREEDY).text


def test_continuous_batching_samples_with_the_servers_settings_and_refuses_a_full_queue(tiny):
    model, tokenizer = tiny
    sampling = GenerateSettings(max_new_tokens=6, temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.0)
    batcher = ContinuousBatcher(model, tokenizer, defaults=sampling, positions=128, max_batch=1, max_queue=2)
    config = batcher.generation_config()
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.7, 0, 0.9)
    made = jobs_for(["今天", "明天"], sampling) + jobs_for(["我们"], replace(sampling, temperature=0.5))
    finished = run_continuous(batcher, made)
    assert [done.choices[0].tokens for done in finished] == [6, 6, 6]
    assert (batcher.stats.continuous_requests, batcher.stats.batches) == (2, 1)  # another temperature: the queue
    batcher = ContinuousBatcher(model, tokenizer, defaults=sampling, positions=128, max_batch=1, max_queue=1)
    batcher.start()
    try:
        batcher.submit([job for job, _ in jobs_for(["一"], replace(sampling, max_new_tokens=100))])
        with pytest.raises(QueueFull):  # one generating, one waiting is the most, and these are two
            batcher.submit([job for job, _ in jobs_for(["二", "三"], sampling)])
    finally:
        batcher.stop()
