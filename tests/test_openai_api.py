"""llmkit.openai_api without a server: requests become settings (or an error naming the field), and events
become OpenAI's objects and chunks. tests/test_serve.py drives the whole app over HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from llmkit.errors import LlmkitError
from llmkit.settings import GenerateSettings

pytest.importorskip("fastapi")

from llmkit.batching import Choice, Failed, Finished, Job, Piece, TimedOut  # noqa: E402
from llmkit.openai_api import (ApiError, ChatRequest, CompletionRequest, Limits, Reply, ServedModel,  # noqa: E402
                               build_app, check_length, check_limits, settings_for, shown_settings)

SERVED = ServedModel("tiny", GenerateSettings(max_new_tokens=40, top_k=10), positions=128)


def test_a_request_overrides_the_served_settings():
    request = CompletionRequest(model="tiny", prompt="今天", max_tokens=5, temperature=0.5, top_p=0.9, n=2, stop="。")
    settings = settings_for(request, SERVED, Limits())
    assert (settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k,
            settings.num_return_sequences, settings.stop) == (5, 0.5, 0.9, 10, 2, ["。"])
    plain = settings_for(CompletionRequest(model="tiny", prompt="x"), SERVED, Limits())
    assert plain.max_new_tokens == 40 and plain.temperature is None  # the model's own, filled in later
    greedy = settings_for(ChatRequest(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=0,
                                      max_completion_tokens=7), SERVED, Limits())
    assert not greedy.sampling and greedy.max_new_tokens == 7


@pytest.mark.parametrize("fields, status, param, message", [
    ({"model": "other"}, 404, "model", "does not exist"),
    ({"max_tokens": 11}, 400, "max_tokens", "at most 10"),
    ({"n": 3, "temperature": 0}, 400, "n", "needs sampling"),
    ({"n": 9}, 400, "n", "at most 8"),
    ({"stop": ["a", ""]}, 400, "stop", "non-empty"),
    ({"stop": list("abcde")}, 400, "stop", "up to 4"),
])
def test_a_request_it_cannot_take_names_the_field(fields, status, param, message):
    request = CompletionRequest(**({"model": "tiny", "prompt": "x"} | fields))
    with pytest.raises(ApiError, match=message) as error:
        settings_for(request, SERVED, Limits(max_tokens=10))
    assert (error.value.status, error.value.param) == (status, param)
    body = json.loads(error.value.response().body)
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_chat_content_may_come_in_text_parts():
    request = ChatRequest(model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "你"},
                                                                             {"type": "text", "text": "好"}]}])
    assert request.messages[0].plain() == {"role": "user", "content": "你好"}
    with pytest.raises(ValueError, match="text"):
        ChatRequest(model="tiny", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_prompt_and_new_tokens_must_fit_the_model():
    check_length([("a", 100)], 28, 128)
    check_length([("a", 100)], 10_000, None)  # a model that does not say
    with pytest.raises(ApiError, match="maximum context length is 128 tokens; the prompt has 101") as error:
        check_length([("a", 3), ("b", 101)], 28, 128)
    assert error.value.code == "context_length_exceeded"


def test_bad_server_options_name_the_flag():
    check_limits(Limits())
    with pytest.raises(LlmkitError, match="--max-batch must be at least 1"):
        check_limits(Limits(max_batch=0))
    with pytest.raises(LlmkitError, match="--timeout must be above 0"):
        check_limits(Limits(timeout=0))
    with pytest.raises(LlmkitError, match="--batching must be dynamic or continuous, got 'static'"):
        check_limits(Limits(batching="static"))


def replay(reply: Reply, events: list, stream: bool, include_usage: bool = False):
    """Feed events as the worker would, then the chunks or the body the client gets."""
    async def go():
        for event in events:
            reply.events.put_nowait(event)
        if stream:
            return [chunk async for chunk in reply.chunks(include_usage)]
        return reply.body(await reply.outcome())

    return asyncio.run(go())


def two_job_reply(chat: bool) -> Reply:
    reply = Reply(chat, "tiny", [("今天", 3), ("明天", 4)], n=2)
    reply.jobs = [Job("今天", GenerateSettings(), print), Job("明天", GenerateSettings(), print)]
    return reply


DONE = [(1, Finished([Choice("c", 1, "stop"), Choice("d", 2, "length")])),
        (0, Finished([Choice("a", 5, "length"), Choice("b", 5, "length")]))]


def test_a_completion_numbers_its_choices_by_prompt_then_n():
    body = replay(two_job_reply(chat=False), DONE, stream=False)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [(choice["index"], choice["text"], choice["finish_reason"]) for choice in body["choices"]] == [
        (0, "a", "length"), (1, "b", "length"), (2, "c", "stop"), (3, "d", "length")]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 13, "total_tokens": 20}


def test_chat_chunks_name_the_role_first_and_end_with_done():
    # pieces waiting together are joined per choice: a client slower than the model gets longer chunks
    pieces = [(0, Piece(1, "你")), (0, Piece(1, "好")), (1, Piece(1, "!"))]
    chunks = replay(two_job_reply(chat=True), [*pieces, *DONE], stream=True, include_usage=True)
    assert all(chunk.startswith("data: ") and chunk.endswith("\n\n") for chunk in chunks)
    assert chunks[-1] == "data: [DONE]\n\n"
    data = [json.loads(chunk[6:]) for chunk in chunks[:-1]]
    assert {datum["object"] for datum in data} == {"chat.completion.chunk"}
    assert [choice["delta"] for choice in data[0]["choices"]] == [{"role": "assistant", "content": ""}] * 4
    assert data[1]["choices"] == [{"index": 1, "delta": {"content": "你好"}, "logprobs": None, "finish_reason": None}]
    assert data[2]["choices"][0]["index"] == 3 and data[2]["choices"][0]["delta"] == {"content": "!"}
    assert [choice["finish_reason"] for choice in data[3]["choices"]] == ["stop", "length"]
    assert [choice["index"] for choice in data[3]["choices"]] == [2, 3]
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == 13


def test_after_the_first_text_a_chunk_holds_the_pieces_of_stream_interval():
    reply = Reply(False, "tiny", [("今天", 3)], n=1, stream_interval=0.5)

    async def go():
        loop = asyncio.get_running_loop()
        reply.events.put_nowait((0, Piece(0, "a")))
        first = await reply.next_events()  # at once: the time to the first token is not held back
        for delay, text in ((0.05, "b"), (0.1, "c")):
            loop.call_later(delay, reply.events.put_nowait, (0, Piece(0, text)))
        reply.events.put_nowait((0, Piece(0, "x")))
        return first, await reply.next_events()

    first, second = asyncio.run(go())
    assert first == [(0, Piece(0, "a"))] and second == [(0, Piece(0, "xbc"))]

    reply = Reply(False, "tiny", [("今天", 3)], n=1, stream_interval=0.5)
    reply.streamed = True  # past the first text

    async def ending():  # a job that ends sends its pieces at once
        reply.events.put_nowait((0, Piece(0, "y")))
        asyncio.get_running_loop().call_later(0.05, reply.events.put_nowait, (0, Finished([])))
        start = time.monotonic()
        return await reply.next_events(), time.monotonic() - start

    events, seconds = asyncio.run(ending())
    assert events == [(0, Piece(0, "y")), (0, Finished([]))] and seconds < 0.4


def test_a_failed_job_ends_the_stream_with_an_error_and_the_body_with_a_status():
    reply = two_job_reply(chat=False)
    chunks = replay(reply, [(0, Failed(TimedOut("not done before its deadline")))], stream=True)
    assert json.loads(chunks[-1][6:])["error"]["type"] == "timeout"
    with pytest.raises(TimedOut):
        replay(two_job_reply(chat=False), [(0, Failed(TimedOut("late")))], stream=False)


def test_the_settings_shown_are_the_ones_used():
    shown = shown_settings(GenerateSettings(max_new_tokens=9, temperature=0.7, top_k=5, top_p=0.8,
                                            repetition_penalty=1.0, greedy=True))
    assert shown == {"max_tokens": 9, "temperature": 0.0, "top_p": 0.8, "top_k": 5, "repetition_penalty": 1.0,
                     "stop": []}


class BrokenBatcher:
    """Takes no request: its submit fails as a bug would."""

    model = counting = None

    def count_tokens(self, text: str, add_special_tokens: bool = True) -> int:
        return 1

    def submit(self, jobs) -> None:
        raise RuntimeError("boom")


def test_a_bug_is_answered_500_in_openais_shape():
    httpx = pytest.importorskip("httpx2")  # the openai client's HTTP library
    app = build_app(BrokenBatcher(), SERVED, Limits())

    async def post():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/completions", json={"model": "tiny", "prompt": "今天"})

    response = asyncio.run(post())
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "internal error: RuntimeError: boom", "type": "server_error",
                                         "param": None, "code": None}}
