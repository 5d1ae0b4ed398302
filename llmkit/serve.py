"""`llmkit serve`: the OpenAI API and a chat page over a model, on one port (llmkit.openai_api), with the
requests that wait batched together (llmkit.batching).

    from llmkit import load_recipe
    from llmkit.serve import run

    run(load_recipe(None, options={"generate.model": "runs/pretrain-zh-tiny"}), port=8000)

Binds the loopback address unless `host` says otherwise. Ctrl-C or SIGTERM stops taking requests and
ends once those in flight are answered (uvicorn's graceful shutdown, at most the request timeout).
"""

from __future__ import annotations

import socket
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.settings import Recipe


def run(recipe: Recipe, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        log_requests: bool = False, **limits) -> None:
    """Serve recipe.generate.model (its [generate] settings as every request's defaults) until stopped.
    `limits`: fields of llmkit.openai_api.Limits (max_tokens, max_queue, max_batch, batch_wait,
    stream_interval, timeout, max_body, max_n, batching)."""
    from llmkit.console import console, quiet_libraries

    require_serving_libraries()
    from llmkit.openai_api import Limits, check_limits

    limits = Limits(**limits)
    check_limits(limits)
    check_address(host, port)
    quiet_libraries()
    import uvicorn

    from llmkit.batching import Batcher, ContinuousBatcher
    from llmkit.engines import Ct2Model, load_generator
    from llmkit.loading import model_positions, resolve_model
    from llmkit.openai_api import ServedModel, build_app

    settings = recipe.generate
    source = resolve_model(settings.model or None, recipe.run.output_dir)
    model, tokenizer = load_generator(source, engine=settings.engine, threads=settings.threads,
                                      device=settings.device, dtype=settings.dtype)
    if isinstance(model, Ct2Model):
        console.print(f"engine: ct2 ({model.folder})", markup=False)
    served = ServedModel(Path(source).name, settings, model_positions(model.config))
    sizes = dict(max_queue=limits.max_queue, max_batch=limits.max_batch, gather=limits.batch_wait)
    if limits.batching == "continuous":
        check_continuous(model)
        batcher = ContinuousBatcher(model, tokenizer, **sizes, defaults=settings, positions=served.positions)
        if batcher.defaults.repetition_penalty != 1.0:  # else most requests would be batched dynamically, unsaid
            console.print(f"continuous batching cannot apply a repetition penalty: requests that keep the default "
                          f"({batcher.defaults.repetition_penalty:g}) are batched dynamically; "
                          "--set generate.repetition_penalty=1.0 batches them continuously", markup=False)
    else:
        batcher = Batcher(model, tokenizer, **sizes)
    app = build_app(batcher, served, limits, api_key)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"serving {served.name} on http://{shown}:{port} (OpenAI API under /v1, chat page at /); "
                  "Ctrl-C stops", markup=False)
    config = uvicorn.Config(app, host=host, port=port, log_config=log_config(log_requests), log_level=None,
                            access_log=log_requests, timeout_graceful_shutdown=int(limits.timeout) + 1)
    draining_server(config).run()
    console.print("server stopped", markup=False)


def require_serving_libraries() -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise LlmkitError(f"llmkit serve needs {' and '.join(missing)}: pip install 'llmkit[serve]'")


def check_continuous(model) -> None:
    """--batching continuous needs transformers' continuous batching, for a decoder-only model whose attention
    it runs (sdpa: what llmkit loads; eager would be switched under the queue's generate calls too)."""
    from llmkit.engines import Ct2Model
    from llmkit.generation import encoder_decoder

    if isinstance(model, Ct2Model):
        raise LlmkitError("--batching continuous needs --engine hf (the ct2 engine batches dynamically)")
    attention = getattr(model.config, "_attn_implementation", None)
    if not hasattr(model, "init_continuous_batching") or encoder_decoder(model) or attention != "sdpa":
        raise LlmkitError(f"--batching continuous: transformers has no continuous batching for this model "
                          f"({type(model).__name__}, attention {attention}); use --batching dynamic")


def check_address(host: str, port: int) -> None:
    """A port that is free on a host this machine has: else one line naming the option, before the model loads."""
    if not 1 <= port <= 65535:
        raise LlmkitError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise LlmkitError(f"--host {host}: {error.strerror}") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise LlmkitError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None


def draining_server(config):
    """uvicorn's server, that on SIGINT/SIGTERM stops taking requests and returns once those in flight are
    answered. (uvicorn itself raises the signal again after that, which ends the process before llmkit can
    say that it stopped: a stop asked for is the normal end of a server, exit status 0.)"""
    import signal
    from contextlib import contextmanager

    import uvicorn

    class DrainingServer(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            before = {number: signal.signal(number, self.handle_exit) for number in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for number, handler in before.items():
                    signal.signal(number, handler)

    return DrainingServer(config)


def log_config(log_requests: bool) -> dict:
    """uvicorn's logging: its own notices only when something is wrong (llmkit prints its one line), and
    with log_requests an access line per request on stdout."""
    from copy import deepcopy

    from uvicorn.config import LOGGING_CONFIG

    config = deepcopy(LOGGING_CONFIG)
    config["loggers"]["uvicorn"]["level"] = "WARNING"
    config["loggers"]["uvicorn.error"]["level"] = "WARNING"
    config["loggers"]["uvicorn.access"]["level"] = "INFO" if log_requests else "WARNING"
    return config
