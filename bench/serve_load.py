"""Load on `llmkit serve`: N concurrent streaming clients against a live server on 127.0.0.1, beside one
client alone: requests/s, tokens/s, p50/p99 latency and time to first token, errors, and the aggregate
tokens/s relative to the single client (what batching the waiting requests buys).

Goal: no errors, and 16 clients x 10 requests at >= 4x the tokens/s of one client.

    python bench/serve_load.py [--model runs/pretrain-zh-tiny] [--clients 16] [--requests 10] [--tokens 64]
                               [--engine hf|ct2] [--temperature 0] [--batching dynamic|continuous]
                               [--repetition-penalty 1.0]

Without a trained model, a random one of the quickstart architecture is built (speed needs no weights).
Each phase is bounded: --requests per client, and no new request after --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai

from generate_speed import random_model  # bench/ is on the path when this file runs

PROMPTS = ["昨天天气很", "中国人民", "今天", "我们的", "经济发展", "北京"]


@dataclass
class Phase:
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def row(self) -> str:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return (f"| {self.clients} | {len(self.latencies)} | {len(self.errors)} | {len(self.latencies) / self.seconds:.2f} "
                f"| {self.tokens_per_second:.0f} | {statistics.median(ordered):.2f} | {p99:.2f} "
                f"| {1000 * statistics.median(self.first_tokens):.0f} |")


def one_request(client: openai.OpenAI, phase: Phase, prompt: str, ask: dict, lock: threading.Lock) -> None:
    start = time.perf_counter()
    first, used = None, 0
    try:
        stream = client.completions.create(prompt=prompt, stream=True,
                                           stream_options={"include_usage": True}, **ask)
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
    except openai.OpenAIError as error:
        with lock:
            phase.errors.append(f"{type(error).__name__}: {error}")
        return
    with lock:
        phase.latencies.append(time.perf_counter() - start)
        phase.first_tokens.append(first if first is not None else phase.latencies[-1])
        phase.tokens += used


def run_phase(url: str, clients: int, requests: int, ask: dict, seconds: float) -> Phase:
    phase, lock = Phase(clients), threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client_loop(number: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=seconds)
        for index in range(requests):
            if time.perf_counter() > stop_at:
                return
            one_request(client, phase, PROMPTS[(number + index) % len(PROMPTS)], ask, lock)

    threads = [threading.Thread(target=client_loop, args=(number,)) for number in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.seconds = time.perf_counter() - start
    return phase


def start_server(model: Path, clients: int, batch_wait: float, engine: str, batching: str,
                 defaults: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", "--model", str(model), "--port", str(port),
                               "--max-queue", str(4 * clients), "--max-batch", str(clients), "--batch-wait", str(batch_wait),
                               "--engine", engine, "--batching", batching, *defaults],
                              stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start")


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health") as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/pretrain-zh-tiny")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10, help="per client")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--seconds", type=float, default=300, help="no new request after this, per phase")
    parser.add_argument("--batch-wait", type=float, default=0.02, help="llmkit serve --batch-wait")
    parser.add_argument("--engine", choices=["hf", "ct2"], default="hf",
                        help="ct2: the model's CTranslate2 export (made first when missing)")
    parser.add_argument("--temperature", type=float, help="0 = greedy (default: sampling, the model's defaults)")
    parser.add_argument("--batching", choices=["dynamic", "continuous"], default="dynamic", help="llmkit serve --batching")
    parser.add_argument("--repetition-penalty", type=float,
                        help="the server's default (continuous batching serves 1.0 only; default: the model's)")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        source = Path(options.model)
        if not (source / "config.json").exists():
            print(f"{source} has no model: using a random model of the quickstart architecture", file=sys.stderr)
            source = random_model(Path(scratch) / "model", [])
        if options.engine == "ct2" and not (source / "ct2").is_dir():
            from llmkit.engines import export_ct2

            export_ct2(str(source), source / "ct2")  # where --engine ct2 finds it
        # the sampling asked for as the server's defaults too: continuous batching serves requests in their mode
        defaults = [f"--set=generate.{key}={value}" for key, value in
                    (("temperature", options.temperature), ("repetition_penalty", options.repetition_penalty))
                    if value is not None]
        server, url = start_server(source, options.clients, options.batch_wait, options.engine, options.batching,
                                   defaults)
        try:
            ask = {"model": health(url)["model"], "max_tokens": options.tokens} | (
                {} if options.temperature is None else {"temperature": options.temperature})
            run_phase(url, 1, 2, ask | {"max_tokens": 8}, options.seconds)  # warm-up
            alone = run_phase(url, 1, options.requests, ask, options.seconds)
            before = health(url)
            together = run_phase(url, options.clients, options.requests, ask, options.seconds)
            after = health(url)
            batches = after["batches"] - before["batches"]
            continuous = after["continuous_requests"] - before["continuous_requests"]
        finally:
            server.terminate()
            server.wait(60)

    if not alone.tokens:
        raise SystemExit(f"one client got no tokens: {(alone.errors or ['no error'])[0]}")
    ratio = together.tokens_per_second / alone.tokens_per_second
    sampling = "the model's sampling defaults" if options.temperature is None else f"temperature {options.temperature}"
    if options.repetition_penalty is not None:
        sampling += f", repetition penalty {options.repetition_penalty}"
    name = options.model if source == Path(options.model) else "random quickstart-shaped model"
    batching = f"--batch-wait {options.batch_wait}" if options.batching == "dynamic" else "--batching continuous"
    print(f"llmkit serve --engine {options.engine}, {name}, max_tokens {options.tokens}, streaming, {sampling}, "
          f"{batching}")
    print("| clients | requests | errors | requests/s | tokens/s | p50 latency s | p99 latency s | p50 first token ms |")
    print("|---|---|---|---|---|---|---|---|")
    print(alone.row())
    print(together.row())
    served = ([f"{len(together.latencies) / batches:.1f} requests a batch on average ({batches} batches)"] if batches
              else []) + ([f"{continuous} requests by continuous batching"] if continuous else [])
    print(f"aggregate tokens/s: {ratio:.1f}x one client (goal >= 4x); {options.clients} clients: {'; '.join(served)}")
    for error in sorted(set(alone.errors + together.errors))[:5]:
        print(f"error: {error}")


if __name__ == "__main__":
    main()
