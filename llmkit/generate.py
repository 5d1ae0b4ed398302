"""`llmkit generate`: write text with a trained model, as plain functions the CLI calls.

    from llmkit.models import load_model
    from llmkit.generate import generate_text, generate_batch
    from llmkit.settings import GenerateSettings

    model, tokenizer = load_model()                      # runs/latest; or a run/model/adapter dir, a hub id
    settings = GenerateSettings(max_new_tokens=20, stop=["。"])
    print(generate_text(model, tokenizer, "昨天天气很", settings, seed=1).text)
    print(generate_batch(model, tokenizer, ["今天", "明天"], settings, seed=1))

Models: a run directory, a model directory, a PEFT adapter directory (adapter_config.json: loaded onto
its base model), a quantized model directory (config.json with quantization_config: loaded as saved)
or a hub id. Generation uses the KV cache; stop strings end generation and cut the text.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from llmkit.errors import LlmkitError
from llmkit.generation import cut_at_stop, generation_kwargs
from llmkit.models import load_model
from llmkit.rundir import write_text
from llmkit.settings import GenerateSettings

CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans SC", "Noto Serif CJK SC",
             "Source Han Sans SC", "Source Han Sans CN", "Source Han Sans", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Hiragino Sans GB",
             "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN", "Arial Unicode MS")
FONT_PACKAGES = ("mplfonts", "noto_cjk_sans_otc", "noto_cjk")  # pip packages that ship CJK fonts
CJK_CHAR = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


# ---------------------------------------------------------------- the command


@dataclass
class AttentionPlot:
    path: Path
    layer: int | None = None  # None: every layer
    head: int | None = None  # None: heads averaged


def run(settings: GenerateSettings, *, output_dir: str = "runs", seed: int = 0, prompt: str | None = None,
        input_path: Path | None = None, output_path: Path | None = None, chat: bool = False,
        attention: AttentionPlot | None = None) -> None:
    """`llmkit generate`: one prompt (or the settings' prompts), a batch file, or a chat session."""
    from llmkit.console import console, error_console, quiet_libraries

    quiet_libraries()
    if sum(bool(x) for x in (prompt is not None, input_path, chat)) > 1:
        raise LlmkitError("--prompt, --input and --chat exclude each other")
    if output_path is not None and input_path is None:
        raise LlmkitError("--output needs --input")
    if prompt is not None:
        check_prompt(prompt, "--prompt")
    rows = None
    if input_path is not None:  # read and check the prompts before the model loads
        check_output_path(output_path)
        rows = read_prompts(input_path, settings.prompt_field)
    model, tokenizer = load_model(settings.model or None, output_dir=output_dir, device=settings.device,
                                  dtype=settings.dtype)
    if chat:
        chat_loop(ChatSession(model, tokenizer, settings, seed=seed))
    elif rows is not None:
        run_batch(model, tokenizer, rows, output_path, settings, seed=seed, progress=error_console.is_terminal)
    else:
        write = lambda text: (sys.stdout.write(text), sys.stdout.flush())  # noqa: E731
        streaming = console.is_terminal and settings.num_return_sequences == 1 and settings.num_beams == 1
        for number, text in enumerate([prompt] if prompt is not None else settings.prompts):
            if streaming:
                write(text)
            generation = generate_text(model, tokenizer, text, settings, seed=seed + number,
                                       stream=write if streaming else None)
            for continuation in generation.texts:
                write(("" if streaming else text + continuation) + "\n")
            error_console.print(generation.summary(), markup=False)
            if attention is not None and number == 0:
                path = plot_generation_attention(model, tokenizer, generation, attention.path, attention.layer,
                                                 attention.head)
                error_console.print(f"attention plot: {path}", markup=False)


# ---------------------------------------------------------------- settings from options


def apply_options(settings: GenerateSettings, **options) -> GenerateSettings:
    """Command-line values over recipe values (None = not given), checked like recipe keys."""
    from llmkit.recipe import check_value

    hints = typing.get_type_hints(GenerateSettings)
    given = {key: value for key, value in options.items() if value is not None}
    for key, value in given.items():
        check_value(f"generate.{key}", value, hints[key], f"--{key.replace('_', '-')}")
        if hints[key] is float:
            given[key] = float(value)
    updated = replace(settings, **given)
    updated.check()
    return updated


# ---------------------------------------------------------------- generation


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
        self.ids.extend(value.reshape(-1).tolist())
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


def encode(tokenizer, texts: list[str], device, add_special_tokens: bool = True):
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
    inputs.pop("token_type_ids", None)
    return inputs


def check_prompt(prompt: str, where: str = "prompt") -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise LlmkitError(f"{where}: empty prompt")


def seed_everything(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)  # all devices


def run_generate(model, tokenizer, inputs, settings: GenerateSettings, streamer=None):
    """model.generate on encoded inputs -> (new token ids [batch x n, new], first-token seconds, seconds).

    The first token is timed where transformers accepts a streamer (no beam search); else it is None."""
    import torch

    clock = FirstTokenClock(streamer) if settings.num_beams == 1 else None
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **generation_kwargs(settings, tokenizer), streamer=clock or streamer)
    seconds = time.perf_counter() - start
    return output[:, inputs["input_ids"].shape[1]:], clock.first if clock else None, seconds


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
    inputs = encode(tokenizer, [prompt], model.device, add_special_tokens)
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
    tokenizer.padding_side = "left"
    seed_everything(seed)
    results: list[list[str]] = []
    n = settings.num_return_sequences
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
        new_ids, _, _ = run_generate(model, tokenizer, encode(tokenizer, batch, model.device), settings)
        texts = decode_new(new_ids, tokenizer, settings.stop)
        results.extend(texts[i * n:(i + 1) * n] for i in range(len(batch)))
        if on_batch is not None:
            on_batch(len(batch))
    return results


# ---------------------------------------------------------------- batch files


def read_prompts(path: str | Path, prompt_field: str = "prompt") -> list[dict]:
    """Rows of a .jsonl file (objects with a prompt field) or a .txt file (one prompt a line)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise LlmkitError(f"{path}: --input must be a .jsonl file (one JSON object a line) or .txt (one prompt a line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise LlmkitError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise LlmkitError(f"{path}: not UTF-8 text") from None
    rows = []
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if path.suffix == ".txt":
            check_prompt(line, where)
            rows.append({prompt_field: line})
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise LlmkitError(f"{where}: not valid JSON: {error}") from None
        if not isinstance(row, dict):
            raise LlmkitError(f"{where}: expected a JSON object with a {prompt_field!r} field")
        if prompt_field not in row:
            raise LlmkitError(f"{where}: no {prompt_field!r} field (set generate.prompt_field to use another)")
        if not isinstance(row[prompt_field], str):
            raise LlmkitError(f"{where}: {prompt_field!r} must be a string, got {row[prompt_field]!r}")
        check_prompt(row[prompt_field], where)
        rows.append(row)
    if not rows:
        raise LlmkitError(f"{path}: no prompts")
    return rows


def write_results(path: str | Path | None, rows: list[dict], settings: GenerateSettings) -> None:
    """.jsonl (or stdout when path is None): the input rows with the generated text added (a list when
    num_return_sequences > 1); .txt: prompt + continuation, one a line (line breaks shown as \\n)."""
    if path is not None and Path(path).suffix == ".txt":
        lines = []
        for row in rows:
            generated = row[settings.output_field]
            for text in generated if isinstance(generated, list) else [generated]:
                lines.append((row[settings.prompt_field] + text).replace("\n", "\\n"))
        write_text(Path(path), "".join(line + "\n" for line in lines))
        return
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if path is None:
        sys.stdout.write(text)
    else:
        write_text(Path(path), text)


def check_output_path(output_path: str | Path | None) -> None:
    if output_path is not None and Path(output_path).suffix not in (".jsonl", ".txt"):
        raise LlmkitError(f"{output_path}: --output must be a .jsonl or .txt file")


def run_batch(model, tokenizer, source: str | Path | list[dict], output_path: str | Path | None,
              settings: GenerateSettings, *, seed: int | None = None, progress: bool = False) -> list[dict]:
    """Generate for every prompt of `source` (a .jsonl/.txt file, or rows from read_prompts) and write
    the rows with the generated text added to output_path (None = stdout)."""
    check_output_path(output_path)
    rows = source if isinstance(source, list) else read_prompts(source, settings.prompt_field)
    prompts = [row[settings.prompt_field] for row in rows]
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from llmkit.console import error_console

        with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=error_console, transient=True) as bar:
            task = bar.add_task("generate", total=len(prompts))
            results = generate_batch(model, tokenizer, prompts, settings, seed=seed,
                                     on_batch=lambda n: bar.advance(task, n))
    else:
        results = generate_batch(model, tokenizer, prompts, settings, seed=seed)
    for row, texts in zip(rows, results):
        row[settings.output_field] = texts[0] if settings.num_return_sequences == 1 else texts
    write_results(output_path, rows, settings)
    return rows


# ---------------------------------------------------------------- chat


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
        if self.templated:
            return self.tokenizer.apply_chat_template(self.history, tokenize=False, add_generation_prompt=True)
        return "\n".join(message["content"] for message in self.history)

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


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], object] | None = None,
              notice: Callable[[str], object] | None = None, stream: bool = True) -> None:
    """Read messages until /exit or end of input (Ctrl-D); /reset clears the history."""
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    notice = notice or (lambda text: print(text, file=sys.stderr))
    if not session.templated:
        notice("this tokenizer has no chat template: continuing the conversation as plain text")
    notice("/reset clears the history, /exit (or Ctrl-D) leaves")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            notice("(history cleared)")
            continue
        if not command:
            continue
        write("model> ")
        generation = session.reply(line, stream=write if stream else None)
        if not stream:
            write(generation.text)
        write("\n")
        notice(generation.summary())


# ---------------------------------------------------------------- attention


def attention_weights(model, tokenizer, ids: list[int]):
    """(token labels, weights [layers, heads, tokens, tokens]) from one forward pass over `ids` with
    eager attention (the fused kernels do not return weights)."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = inner.config._attn_implementation
    inner.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            output = model(input_ids=torch.tensor([ids], device=model.device), output_attentions=True,
                           use_cache=False)
    finally:
        inner.set_attn_implementation(previous)
    if not output.attentions or output.attentions[0] is None:
        raise LlmkitError(f"{type(inner).__name__} does not return attention weights")
    weights = torch.stack([layer[0].float().cpu() for layer in output.attentions])
    return [token_label(tokenizer, token) for token in ids], weights


def token_label(tokenizer, token: int) -> str:
    text = tokenizer.decode([token])
    return text.replace("\n", "\\n").replace(" ", "␣") or tokenizer.convert_ids_to_tokens(token)


def find_cjk_font():
    """A font with Chinese glyphs: installed on the system, or shipped by a pip package; None if none."""
    from importlib.util import find_spec

    from matplotlib import font_manager

    installed = {font.name: font.fname for font in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in installed:
            return font_manager.FontProperties(fname=installed[name])
    for name, fname in installed.items():
        if re.search(r"CJK|Han Sans|Hei|Ming|Song|Kai", name):
            return font_manager.FontProperties(fname=fname)
    for package in FONT_PACKAGES:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(spec.submodule_search_locations[0])
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".otf", ".ttf", ".ttc"))
        preferred = [p for p in files if re.search(r"sanscjksc|cjk.*sc|hei", p.name, re.IGNORECASE)]
        for path in preferred + files:
            return font_manager.FontProperties(fname=str(path))
    return None


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        from llmkit.console import error_console

        error_console.print(f"warning: {message}", markup=False)


def plot_attention(tokens: list[str], weights, path: str | Path, layer: int | None = None,
                   head: int | None = None) -> Path:
    """A heatmap of attention per layer (heads averaged, or `head`), in a grid; `layer` picks one."""
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layers, n_heads = weights.shape[0], weights.shape[1]
    if layer is not None and not 0 <= layer < n_layers:
        raise LlmkitError(f"--attention-layer {layer}: the model has layers 0..{n_layers - 1}")
    if head is not None and not 0 <= head < n_heads:
        raise LlmkitError(f"--attention-head {head}: the model has heads 0..{n_heads - 1}")
    layers = [layer] if layer is not None else list(range(n_layers))
    font = find_cjk_font()
    if font is None and any(CJK_CHAR.search(token) for token in tokens):
        warn_once("no CJK font found (install one, e.g. fonts-noto-cjk, or `pip install mplfonts`): "
                  "Chinese tokens in the attention plot show as boxes")
    columns = math.ceil(math.sqrt(len(layers)))
    rows = math.ceil(len(layers) / columns)
    side = min(max(4.0, 0.22 * len(tokens) + 1.5), 16.0)
    figure = Figure(figsize=(side * columns, side * rows), layout="constrained")
    FigureCanvasAgg(figure)
    label_size = max(3.0, min(10.0, 240 / max(len(tokens), 1)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        for index, number in enumerate(layers):
            axes = figure.add_subplot(rows, columns, index + 1)
            matrix = weights[number].mean(0) if head is None else weights[number, head]
            image = axes.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
            axes.set_title(f"layer {number}, " + ("heads averaged" if head is None else f"head {head}"))
            axes.set_xticks(range(len(tokens)))
            axes.set_yticks(range(len(tokens)))
            axes.set_xticklabels(tokens, rotation=90, fontsize=label_size, fontproperties=font)
            axes.set_yticklabels(tokens, fontsize=label_size, fontproperties=font)
            axes.set_xlabel("attended to (key)")
            axes.set_ylabel("attending (query)")
            figure.colorbar(image, ax=axes, shrink=0.8)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    return path


def plot_generation_attention(model, tokenizer, generation: Generation, path: str | Path,
                              layer: int | None = None, head: int | None = None) -> Path:
    """The attention heatmap over a generation's prompt + generated tokens."""
    tokens, weights = attention_weights(model, tokenizer, generation.ids)
    return plot_attention(tokens, weights, path, layer, head)
