"""llmkit serve, started as a subprocess on a free loopback port over a tiny random llama, driven by the real
`openai` client: completions, chat, streaming, stop strings, errors in OpenAI's shape, the API key, a full
queue, batching of waiting requests, and draining on SIGTERM. Greedy text through the server is the text
llmkit's own generation makes of the same prompt."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.settings import GenerateSettings

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from llmkit.generation import ChatSession, generate_text  # noqa: E402
from llmkit.loading import load_model  # noqa: E402
from tests.conftest import char_tokenizer, save_tiny_model, wait_until  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
SERVER_LINE = "serving model on http://127.0.0.1:"
GREEDY = GenerateSettings(max_new_tokens=8, greedy=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny llama with a chat template, taking 4,096 positions (rotary: any length works), so that a
    request can run long enough for others to wait behind it."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    path = save_tiny_model(tmp_path_factory.mktemp("serve") / "model", "LlamaForCausalLM", tokenizer)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    return path


@pytest.fixture(scope="module")
def local(model_dir):
    return load_model(str(model_dir))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`llmkit serve` in a subprocess; stderr kept for the end."""

    def __init__(self, model_dir: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
        self.process = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", "--model", str(model_dir),
                                         "--port", str(self.port), *options],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 120
        while not self.up():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"the server did not start: {self.process.communicate()[1]}")
            time.sleep(0.2)

    def up(self) -> bool:
        try:
            return get(f"{self.url}/health")[0] == 200
        except OSError:
            return False

    def health(self) -> dict:
        return get(f"{self.url}/health")[1]

    def client(self, key: str = "none", **options) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **options)

    def stop(self) -> tuple[int, str, str]:
        """SIGTERM, as a service manager stops it: (exit status, stdout, stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        return self.process.returncode, out, err


def get(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a plain request, errors included."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} | (headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def serving(model_dir: Path, *options: str, notes: tuple[str, ...] = ()):
    server = Server(model_dir, *options)
    try:
        yield server
    finally:
        status, _, err = server.stop()
        assert status == 0, err
        # stderr holds llmkit's own lines only (notes: what it says before serving): no uvicorn notices, no access log
        assert [line for line in err.splitlines() if line.strip()] == [
            *notes, f"{SERVER_LINE}{server.port} (OpenAI API under /v1, chat page at /); Ctrl-C stops", "server stopped"]


@pytest.fixture(scope="module")
def server(model_dir):
    # a chunk a token (--stream-interval 0), so that streaming shows as many chunks
    with serving(model_dir, "--max-tokens", "3000", "--max-body", "20000", "--stream-interval", "0") as running:
        yield running


LONG = 400  # new tokens of "长", greedy, before its end token (at 420 on some CPUs): 0.2 to 1 s by the CPU


def long_stream(client, **options):
    """A streaming request that keeps the worker busy for a while, once its first token has come."""
    stream = client.completions.create(model="model", prompt="长", max_tokens=LONG, temperature=0, stream=True,
                                       **options)
    next(iter(stream))
    return stream


def test_models_and_health(server):
    assert [model.id for model in server.client().models.list()] == ["model"]
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "model"
    # the model's defaults (none in its generation_config) are llmkit's
    assert health["settings"] | {"max_tokens": 0} == {"max_tokens": 0, "temperature": 0.8, "top_p": 0.95, "top_k": 50,
                                                      "repetition_penalty": 1.1, "stop": []}


def test_greedy_completion_is_llmkits_own_generation_token_for_token(server, local):
    model, tokenizer = local
    for prompt in ("今天", "中国人民"):
        completion = server.client().completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0)
        own = generate_text(model, tokenizer, prompt, GREEDY)
        choice = completion.choices[0]
        assert tokenizer(choice.text, add_special_tokens=False)["input_ids"] == own.ids[-8:]
        assert choice.text == own.text and choice.finish_reason == "length"
        prompt_tokens = len(tokenizer(prompt)["input_ids"])
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
                completion.usage.total_tokens) == (prompt_tokens, 8, prompt_tokens + 8)


def test_chat_uses_the_chat_template(server, local):
    model, tokenizer = local
    tokenizer.chat_template = CHAT_TEMPLATE
    reply = server.client().chat.completions.create(model="model", messages=[{"role": "user", "content": "你好"}],
                                                     max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == ChatSession(model, tokenizer, GREEDY).reply("你好").text
    templated = "<s>user:你好\n<s>assistant:"
    assert reply.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])


def test_streaming_gives_the_same_text_and_cuts_at_a_stop_string(server):
    client = server.client()
    full = client.completions.create(model="model", prompt="我们", max_tokens=12, temperature=0).choices[0].text
    stop = full[5]
    cut = full[:full.index(stop)]
    pieces = [chunk.choices[0] for chunk in client.completions.create(
        model="model", prompt="我们", max_tokens=12, temperature=0, stop=[stop], stream=True)]
    # how many chunks the text takes depends on speed: pieces waiting when the server reads them go out
    # together (test_openai_api checks the chunking itself); the text and its end do not
    assert "".join(piece.text for piece in pieces) == cut
    assert [piece.finish_reason for piece in pieces] == [None] * (len(pieces) - 1) + ["stop"]
    chat = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "我们"}],
                                          max_tokens=6, temperature=0, stream=True,
                                          stream_options={"include_usage": True})
    chunks = list(chat)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    plain = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "我们"}],
                                           max_tokens=6, temperature=0)
    assert streamed == plain.choices[0].message.content


def test_seeded_sampling_repeats_and_n_gives_n_choices(server):
    client = server.client()
    ask = dict(model="model", prompt="今天", max_tokens=10, temperature=1.0, top_p=1.0, n=3, seed=7)
    first, second = client.completions.create(**ask), client.completions.create(**ask)
    texts = [choice.text for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.text for choice in second.choices] and len(set(texts)) == 3
    assert first.usage.completion_tokens == 30
    other = client.completions.create(**ask | {"seed": 8})
    assert [choice.text for choice in other.choices] != texts


def test_bad_requests_get_openais_error_shape(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="model", prompt="今天", max_tokens=0)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="n > 1 needs sampling"):
        client.completions.create(model="model", prompt="今天", n=2, temperature=0)
    with pytest.raises(openai.BadRequestError, match="at most 3000"):
        client.completions.create(model="model", prompt="今天", max_tokens=5000)
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="model", prompt="今" * 1500, max_tokens=3000)
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="今天")
    status, body = get(f"{server.url}/v1/chat/completions", b'{"model": "model", "messages": []}')
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == "messages" and body["error"]["type"] == "invalid_request_error"
    assert get(f"{server.url}/v1/completions", b"{not json")[0] == 400
    assert get(f"{server.url}/v1/completions", json.dumps({"model": "model", "prompt": "长" * 10_000}).encode()) \
        == (413, {"error": {"message": "request body over 20000 bytes (--max-body)",
                            "type": "invalid_request_error", "param": None, "code": "body_too_large"}})
    assert get(f"{server.url}/v1/nowhere")[1]["error"]["type"] == "not_found_error"


def check_waiting_requests_go_in_one_batch(server, local, stream: bool = False) -> None:
    """Four requests wait behind a long one; it is given up, and they are generated together, each with
    the greedy text it has alone (the same length: no padding)."""
    model, tokenizer = local
    client = server.client()
    prompts = ["今天", "明天", "昨天", "我们"]
    before = server.health()
    long = long_stream(client)
    results: dict[str, str] = {}

    def ask(prompt: str) -> None:
        answer = client.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0, stream=stream)
        results[prompt] = "".join(chunk.choices[0].text for chunk in answer) if stream else answer.choices[0].text

    threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in prompts]
    for thread in threads:
        thread.start()
    wait_until(lambda: server.health()["queued"] == 4, every=0.05)
    long.close()  # the client leaves: its request stops at the next token and the four go together
    for thread in threads:
        thread.join(60)
    after = server.health()
    assert after["largest_batch"] == 4 and after["batched_requests"] - before["batched_requests"] == 4
    assert after["batches"] - before["batches"] == 2
    assert results == {prompt: generate_text(model, tokenizer, prompt, GREEDY).text for prompt in prompts}


def test_waiting_requests_are_generated_in_one_batch(server, local):
    check_waiting_requests_go_in_one_batch(server, local)


def test_the_ct2_engine_serves_batches_with_the_same_greedy_text(model_dir, local, tmp_path):
    pytest.importorskip("ctranslate2", reason="the ct2 engine's wheel is not installed (pip install 'llmkit[fast]')")
    from llmkit.engines import export_ct2

    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    export_ct2(str(copy), copy / "ct2")
    with serving(copy, "--engine", "ct2", "--stream-interval", "0", notes=(f"engine: ct2 ({copy / 'ct2'})",)) as server:
        check_waiting_requests_go_in_one_batch(server, local, stream=True)


def test_continuous_batching_lets_requests_join_a_running_one(model_dir, local):
    """--batching continuous: short requests of different lengths are answered while a long one streams (a
    dynamic batch would make them wait for its end), each with the greedy text llmkit generates alone; the
    long one's client leaves and its place serves the next."""
    model, tokenizer = local
    plain = GenerateSettings(max_new_tokens=8, greedy=True, repetition_penalty=1.0)
    options = ("--batching", "continuous", "--max-batch", "2", "--max-tokens", "3000",
               "--set", "generate.temperature=0", "--set", "generate.repetition_penalty=1.0")
    shorts = {(prompt, length): generate_text(model, tokenizer, prompt, replace(plain, max_new_tokens=length)).text
              for prompt, length in (("今天", 3), ("中国人民", 8), ("我们", 5))}
    full = generate_text(model, tokenizer, "我们", replace(plain, max_new_tokens=12)).text
    stop = full[5]
    with serving(model_dir, *options) as server:  # the references are made first: the long request lasts ~0.3 s
        client = server.client()
        long = long_stream(client)
        for (prompt, length), reference in shorts.items():
            assert client.completions.create(model="model", prompt=prompt, max_tokens=length).choices[0].text == reference
        streamed = client.completions.create(model="model", prompt="我们", max_tokens=12, stop=[stop], stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed) == full[:full.index(stop)]
        assert server.health()["generating"] == 1 and server.health()["continuous_requests"] == 4  # long: still going
        long.close()
        wait_until(lambda: server.health()["continuous_requests"] == 4 and server.health()["queued"] == 0,
                   every=0.05)
        assert client.completions.create(model="model", prompt="今天", max_tokens=2).usage.completion_tokens == 2
        assert server.health()["batches"] == 0  # no request went through the dynamic queue


def test_continuous_batching_says_at_start_that_the_default_repetition_penalty_sends_requests_to_the_dynamic_queue(
        model_dir):
    note = ("continuous batching cannot apply a repetition penalty: requests that keep the default (1.1) are batched "
            "dynamically; --set generate.repetition_penalty=1.0 batches them continuously")
    with serving(model_dir, "--batching", "continuous", "--max-batch", "2", notes=(note,)) as server:
        assert server.client().completions.create(model="model", prompt="今天", max_tokens=2).usage.completion_tokens == 2
        assert server.health()["batches"] == 1 and server.health()["continuous_requests"] == 0


def test_continuous_batching_refuses_a_model_it_cannot_run(local):
    from llmkit.errors import LlmkitError
    from llmkit.serve import check_continuous

    model, _ = local
    check_continuous(model)  # sdpa, as llmkit loads it
    model.config._attn_implementation = "eager"
    try:
        with pytest.raises(LlmkitError, match="no continuous batching for this model .*attention eager"):
            check_continuous(model)
    finally:
        model.config._attn_implementation = "sdpa"


def test_a_full_queue_answers_429_and_a_key_is_required(model_dir):
    with serving(model_dir, "--max-queue", "1", "--api-key", "sesame", "--max-tokens", "3000") as server:
        with pytest.raises(openai.AuthenticationError) as unauthorised:
            server.client("wrong").models.list()
        assert unauthorised.value.status_code == 401 and unauthorised.value.body["code"] == "invalid_api_key"
        assert get(f"{server.url}/v1/models")[0] == 401
        assert server.health()["status"] == "ok"  # probes need no key
        client = server.client("sesame")
        stream = long_stream(client)
        waiting = threading.Thread(target=lambda: client.completions.create(model="model", prompt="一", max_tokens=2))
        waiting.start()
        wait_until(lambda: server.health()["queued"] == 1, every=0.05)
        with pytest.raises(openai.RateLimitError) as full:
            client.completions.create(model="model", prompt="二", max_tokens=2)
        assert full.value.status_code == 429 and full.value.body["code"] == "queue_full"
        stream.close()
        waiting.join(60)
        assert server.health()["requests"] == 2


def test_sigterm_lets_the_request_in_flight_finish(model_dir):
    server = Server(model_dir, "--log-requests")
    chunks = iter(long_stream(server.client(), stream_options={"include_usage": True}))
    server.process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest[-2].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == LONG
    status, out, err = server.stop()
    assert status == 0 and err.strip().endswith("server stopped")
    assert '"POST /v1/completions HTTP/1.1" 200' in out  # --log-requests: access lines on stdout


def test_a_request_over_its_time_gets_504(model_dir):
    with serving(model_dir, "--timeout", "0.2") as server:
        with pytest.raises(openai.APIStatusError) as late:
            server.client().completions.create(model="model", prompt="长", max_tokens=LONG, temperature=0)
        assert late.value.status_code == 504 and late.value.body["type"] == "timeout"
        assert server.client().completions.create(model="model", prompt="长", max_tokens=2).choices[0].text


def test_bad_options_are_one_line_before_the_model_loads(model_dir):
    runner = CliRunner()
    missing = str(model_dir.parent / "nothing-here")
    for options, message in ((["--model", str(model_dir), "--port", "70000"], "--port must be in 1..65535"),
                             (["--model", str(model_dir), "--max-queue", "0"], "--max-queue must be at least 1"),
                             (["--model", missing, "--port", str(free_port())], f"model not found: {missing}")):
        result = runner.invoke(app, ["serve", *options])
        assert result.exit_code == 2 and message in result.output, result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = runner.invoke(app, ["serve", "--model", str(model_dir), "--port", str(taken.getsockname()[1])])
    assert result.exit_code == 2 and "cannot listen there" in result.output


CHROMIUM = Path("/usr/bin/chromium")  # Debian's (apt-get install chromium; .ci/run installs it)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_chat_page_streams_replies_in_a_browser(server, local, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), f"no {CHROMIUM}: apt-get install chromium (.ci/run does it)"
    model, tokenizer = local
    tokenizer.chat_template = CHAT_TEMPLATE
    session = ChatSession(model, tokenizer, GenerateSettings(max_new_tokens=30, greedy=True))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_function("document.getElementById('model').textContent.startsWith('model')")
        assert page.input_value("#temperature") == "0.8" and page.input_value("#top_p") == "0.95"
        page.fill("#temperature", "0")  # greedy: the reply is known
        page.fill("#max_tokens", "30")
        # every change of a reply's text is a DOM mutation of its bubble: a streamed reply is several, a whole one one
        page.evaluate("window.updates = 0; new MutationObserver(records => window.updates += records.filter("
                      "record => record.target.classList.contains('assistant')).length)"
                      ".observe(document.getElementById('log'), {subtree: true, childList: true})")
        for number, message in enumerate(["你好", "今天天气怎么样"], 1):
            page.fill("#input", message)
            page.press("#input", "Enter")
            page.wait_for_selector(f".assistant.done >> nth={number - 1}", timeout=30_000)
            shown = page.evaluate(f"document.querySelectorAll('.assistant')[{number - 1}].firstChild.textContent")
            assert shown == session.reply(message).text  # the history goes with the second message
        assert page.evaluate("window.updates") > 2 * 3 and page.locator(".error").count() == 0  # more than text + meta
        page.screenshot(path=str(tmp_path / "chat-page.png"))
        page.click("#new-chat")
        assert page.locator(".message").count() == 0
        browser.close()
    assert (tmp_path / "chat-page.png").stat().st_size > 10_000
