"""Text generation, the library every command calls: `llmkit generate`, samples during pretraining,
scoring by generation (`llmkit eval`), measuring speed (`llmkit quantize`).

    from llmkit.loading import load_model
    from llmkit.generation import generate_text, generate_batch
    from llmkit.settings import GenerateSettings

    model, tokenizer = load_model()                      # runs/latest; or a run/model/adapter dir, a hub id
    settings = GenerateSettings(max_new_tokens=20, stop=["。"])
    print(generate_text(model, tokenizer, "昨天天气很", settings, seed=1).text)
    print(generate_batch(model, tokenizer, ["今天", "明天"], settings, seed=1))

GenerateSettings become `model.generate` arguments (KV cache on); stop strings end generation and cut
the text, also while it streams; batches pad on the left; a chat session keeps the history under the
tokenizer's chat template.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from llmkit.errors import LlmkitError
from llmkit.settings import GenerateSettings

DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}


def with_model_defaults(settings: GenerateSettings, model) -> GenerateSettings:
    """The settings to generate with: what the recipe or the command line set, else what the model's own
    generation_config.json sets (the values its maker changed from transformers' defaults, read as vLLM
    reads them), else llmkit's DEFAULT_SAMPLING. A model made elsewhere generates here as it does there."""
    config = getattr(model, "generation_config", None)
    own = config.to_diff_dict() if config is not None else {}
    unset = {key: own.get(key, default) for key, default in DEFAULT_SAMPLING.items() if getattr(settings, key) is None}
    return replace(settings, **unset)


def generation_kwargs(settings: GenerateSettings, tokenizer, model) -> dict:
    """GenerateSettings -> keyword arguments of `model.generate` (KV cache on, stop strings included), unset
    values from the model (with_model_defaults); its end-of-sequence ids, a list in many chat models, end
    generation (the tokenizer's end token where the model names none)."""
    settings = with_model_defaults(settings, model)
    config = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config is not None and config.eos_token_id is not None else tokenizer.eos_token_id
    sampling = settings.sampling
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=sampling,
                  num_beams=settings.num_beams, num_return_sequences=settings.num_return_sequences,
                  repetition_penalty=settings.repetition_penalty, use_cache=True,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                  eos_token_id=eos)
    if sampling:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    else:  # neutral values, so that a model's own generation_config does not warn about unused ones
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if settings.stop:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([stop_criterion(tokenizer, settings.stop)])
    return kwargs


def stop_criterion(tokenizer, stops: list[str]):
    """Ends each sequence once its generated text holds a stop string. Works on the decoded text, so it
    fits any tokenizer (transformers' stop_strings needs a vocabulary it can take apart)."""
    import torch
    from transformers import StoppingCriteria

    class StopOnStrings(StoppingCriteria):
        def __init__(self) -> None:
            self.start: int | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.start is None:  # first call: the prompt plus one new token
                self.start = input_ids.shape[1] - 1
            texts = tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
            return torch.tensor([any(stop in text for stop in stops) for text in texts], device=input_ids.device)

    return StopOnStrings()


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cut = min((index for index in (text.find(stop) for stop in stops if stop) if index >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class Generation:
    """Continuations of one prompt, with how long they took."""

    prompt: str
    texts: list[str]  # continuations (num_return_sequences), cut at the first stop string
    new_tokens: int  # tokens generated, all sequences together
    seconds: float
    first_token_seconds: float | None = None
    ids: list[int] = field(default_factory=list)  # prompt + generated token ids of the first sequence

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        first = f"{self.first_token_seconds * 1000:.0f} ms" if self.first_token_seconds is not None else "n/a"
        return (f"{self.new_tokens} new tokens in {self.seconds:.2f} s, {self.tokens_per_second:.1f} tokens/s, "
                f"time to first token {first}")


class FirstTokenClock:
    """A streamer that notes when the first new token arrives and passes every call on to `inner`.

    (A logits processor could time it too, but any custom one costs transformers' greedy fast path
    ~20% of the throughput of a small model.)"""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.start = time.perf_counter()
        self.first: float | None = None
        self.prompt_seen = False  # generate() puts the prompt first, then each new token

    def put(self, value) -> None:
        if self.prompt_seen and self.first is None:
            self.first = time.perf_counter() - self.start
        self.prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def put_row(self, row: int, value) -> None:
        """One row's token, from an engine that gives a batch's rows one at a time (llmkit.engines), for an
        inner streamer that takes them so (llmkit.batching.RowStreamer)."""
        if not hasattr(self.inner, "put_row"):
            self.put(value)
            return
        if self.first is None:
            self.first = time.perf_counter() - self.start
        self.inner.put_row(row, value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class StopStreamer:
    """Streams the new text as it is made to `write`, never past a stop string: a tail that could be the
    start of one is held back until it is known not to be (and half-decoded bytes likewise)."""

    def __init__(self, tokenizer, write: Callable[[str], object], stops: Iterable[str] = ()) -> None:
        self.tokenizer, self.write, self.stops = tokenizer, write, [stop for stop in stops if stop]
        self.ids: list[int] = []
        self.emitted = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.add(value.reshape(-1).tolist())

    def add(self, ids: list[int]) -> None:
        """New token ids, from a caller that gives them as lists (the server's continuous batching)."""
        self.ids.extend(ids)
        self.flush(final=False)

    def end(self) -> None:
        self.flush(final=True)

    def flush(self, final: bool) -> None:
        if self.stopped:
            return
        text, stopped = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        safe = len(text)
        if not (stopped or final):
            safe = len(text.rstrip("\ufffd"))
            for stop in self.stops:
                for size in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:size]):
                        safe = min(safe, len(text[:safe]) - size)
                        break
        if safe > self.emitted:
            self.write(text[self.emitted:safe])
            self.emitted = safe
        self.stopped = stopped


def encoder_decoder(model) -> bool:
    """An encoder-decoder (T5, BART): the prompt goes to the encoder and the output is all new, from the
    decoder's start token on; a decoder-only model's output repeats the prompt first."""
    return bool(getattr(model.config, "is_encoder_decoder", False))


def new_ids_of(model, output, inputs):
    """The generated part of model.generate's output: after the prompt (decoder-only) or after the
    decoder start token (encoder-decoder)."""
    return output[:, 1:] if encoder_decoder(model) else output[:, inputs["input_ids"].shape[1]:]


def encode_prompts(tokenizer, texts: list[str], device, add_special_tokens: bool = True, model=None):
    """Prompts as model inputs, padded on the left: every prompt ends where generation starts (an
    encoder-decoder's encoder reads them padded on the right, as in training)."""
    side = "right" if model is not None and encoder_decoder(model) else "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side=side,
                       add_special_tokens=add_special_tokens).to(device)
    inputs.pop("token_type_ids", None)
    return inputs


def check_prompt(prompt: str, where: str = "prompt") -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise LlmkitError(f"{where}: empty prompt")


def seed_everything(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)  # all devices


def run_generate(model, tokenizer, inputs, settings: GenerateSettings, streamer=None, stopping: tuple = ()):
    """model.generate on encoded inputs -> (new token ids [batch x n, new], first-token seconds, seconds);
    for a decoder-only model and an encoder-decoder alike (new_ids_of). `stopping`: more StoppingCriteria
    (the server's, that end the sequences of requests given up).

    The first token is timed where transformers accepts a streamer (no beam search); else it is None."""
    import torch

    clock = FirstTokenClock(streamer) if settings.num_beams == 1 else None
    kwargs = generation_kwargs(settings, tokenizer, model)
    if stopping:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([*kwargs.get("stopping_criteria", []), *stopping])
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **kwargs, streamer=clock or streamer)
    seconds = time.perf_counter() - start
    return new_ids_of(model, output, inputs), clock.first if clock else None, seconds


def count_new_tokens(new_ids, tokenizer) -> int:
    """Generated tokens up to and including each sequence's end (padding after it not counted)."""
    total = 0
    for row in new_ids.tolist():
        length = len(row)
        while length and row[length - 1] == tokenizer.pad_token_id:
            length -= 1
        if length < len(row) and tokenizer.pad_token_id == tokenizer.eos_token_id:
            length += 1  # the end token itself
        total += length
    return total


def decode_new(new_ids, tokenizer, stops: Iterable[str]) -> list[str]:
    return [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stops)[0] for row in new_ids]


def generate_text(model, tokenizer, prompt: str, settings: GenerateSettings | None = None, *,
                  seed: int | None = None, stream: Callable[[str], object] | None = None,
                  add_special_tokens: bool = True) -> Generation:
    """Continue one prompt. `stream` (e.g. sys.stdout.write) receives the new text as it is made; it needs
    one sequence and no beam search (otherwise the text comes only in the result)."""
    settings = settings or GenerateSettings()
    check_prompt(prompt)
    seed_everything(seed)
    inputs = encode_prompts(tokenizer, [prompt], model.device, add_special_tokens, model)
    streamer = None
    if stream is not None and settings.num_return_sequences == 1 and settings.num_beams == 1:
        streamer = StopStreamer(tokenizer, stream, settings.stop)
    new_ids, first, seconds = run_generate(model, tokenizer, inputs, settings, streamer)
    texts = decode_new(new_ids, tokenizer, settings.stop)
    first_row = [token for token in new_ids[0].tolist() if token != tokenizer.pad_token_id]
    return Generation(prompt=prompt, texts=texts, new_tokens=count_new_tokens(new_ids, tokenizer),
                      seconds=seconds, first_token_seconds=first,
                      ids=inputs["input_ids"][0].tolist() + first_row)


def generate_batch(model, tokenizer, prompts: list[str], settings: GenerateSettings | None = None, *,
                   seed: int | None = None, batch_size: int | None = None,
                   on_batch: Callable[[int], object] | None = None) -> list[list[str]]:
    """Continue many prompts, `batch_size` at a time with left padding: one list of
    num_return_sequences continuations per prompt, in order. on_batch(n) is called after each batch."""
    settings = settings or GenerateSettings()
    for number, prompt in enumerate(prompts, 1):
        check_prompt(prompt, f"prompt {number}")
    size = batch_size or settings.batch_size
    seed_everything(seed)
    results: list[list[str]] = []
    n = settings.num_return_sequences
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
        new_ids, _, _ = run_generate(model, tokenizer, encode_prompts(tokenizer, batch, model.device, model=model), settings)
        texts = decode_new(new_ids, tokenizer, settings.stop)
        results.extend(texts[i * n:(i + 1) * n] for i in range(len(batch)))
        if on_batch is not None:
            on_batch(len(batch))
    return results


def continue_prompts(model, tokenizer, prompts: list[str], settings: GenerateSettings, seed: int) -> list[str]:
    """Sample one continuation per prompt, leaving the caller's random state untouched (so that
    showing samples during training does not change the training run): the prompt and its continuation
    (an encoder-decoder's output follows its prompt after " → ")."""
    import torch

    was_training = model.training
    model.eval()
    texts = []
    kwargs = generation_kwargs(settings, tokenizer, model) | {"num_return_sequences": 1, "num_beams": 1}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for prompt in prompts:
            inputs = encode_prompts(tokenizer, [prompt], model.device, model=model)
            output = model.generate(**inputs, **kwargs)
            new_tokens = new_ids_of(model, output, inputs)[0]
            text = cut_at_stop(tokenizer.decode(new_tokens, skip_special_tokens=True), settings.stop)[0]
            texts.append(f"{prompt} → {text}" if encoder_decoder(model) else prompt + text)
    model.train(was_training)
    return texts


def generation_speed(model, tokenizer, prompt: str, tokens: int, runs: int) -> float:
    """Greedy generation at batch 1 with the KV cache: tokens/s over exactly `tokens` new tokens, the
    median of `runs` runs after one warm-up."""
    import torch

    settings = GenerateSettings(greedy=True, max_new_tokens=tokens, repetition_penalty=1.0)
    kwargs = generation_kwargs(settings, tokenizer, model) | {"min_new_tokens": tokens}
    inputs = encode_prompts(tokenizer, [prompt], model.device, model=model)
    rates = []
    with torch.inference_mode():
        for run_index in range(runs + 1):
            start = time.perf_counter()
            model.generate(**inputs, **kwargs)
            if run_index:
                rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


# ---------------------------------------------------------------- chat


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt that asks for the next reply to `messages` ({"role", "content"} dicts): the tokenizer's
    chat template when it has one (encode it without special tokens: the template holds them), else the
    messages' texts joined by line breaks."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(message["content"] for message in messages)


class ChatSession:
    """A conversation: the tokenizer's chat template over the history when it has one, else plain
    continuation of the history's texts joined by line breaks."""

    def __init__(self, model, tokenizer, settings: GenerateSettings | None = None, seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = replace(settings or GenerateSettings(), num_return_sequences=1, num_beams=1)
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.history: list[dict] = []
        seed_everything(seed)

    def prompt_text(self) -> str:
        return chat_prompt(self.tokenizer, self.history)

    def prompt_ids(self) -> list[int]:
        return self.tokenizer(self.prompt_text(), add_special_tokens=not self.templated)["input_ids"]

    def reply(self, text: str, stream: Callable[[str], object] | None = None) -> Generation:
        check_prompt(text, "message")
        self.history.append({"role": "user", "content": text})
        generation = generate_text(self.model, self.tokenizer, self.prompt_text(), self.settings, stream=stream,
                                   add_special_tokens=not self.templated)
        self.history.append({"role": "assistant", "content": generation.text})
        return generation

    def reset(self) -> None:
        self.history.clear()
