"""`llmkit generate`: write text with a trained model: one prompt (streamed on a terminal), a file of
prompts, or a chat session; optionally a heatmap of the attention over the text.

    from llmkit import load_recipe
    from llmkit.generate import run

    run(load_recipe(None, options={"generate.max_new_tokens": 20}), prompt="昨天天气很")

The generation itself is llmkit.generation; this module reads and writes the command's files.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmkit.errors import LlmkitError
from llmkit.generation import ChatSession, check_prompt, encoder_decoder, generate_batch, generate_text
from llmkit.engines import Ct2Model, load_generator
from llmkit.report import plot_generation_attention
from llmkit.rundir import jsonl_values, read_text, write_text
from llmkit.scenes import CAPTION_PROMPT
from llmkit.settings import GenerateSettings, Recipe


@dataclass
class AttentionPlot:
    path: Path
    layer: int | None = None  # None: every layer
    head: int | None = None  # None: heads averaged


def run(recipe: Recipe, *, seed: int | None = None, prompt: str | None = None, input_path: Path | None = None,
        output_path: Path | None = None, chat: bool = False, attention: AttentionPlot | None = None,
        images: list[Path] | None = None) -> None:
    """`llmkit generate` with the recipe's [generate] settings: one prompt (or the settings' prompts), a
    batch file, or a chat session; with `images`, or an --input whose rows name pictures (generate.image_field),
    a vision-language model writes about each picture. `seed`: None = run.seed."""
    from llmkit.console import console, quiet_libraries, stdout

    quiet_libraries()
    settings, output_dir = recipe.generate, recipe.run.output_dir
    seed = recipe.run.seed if seed is None else seed
    if sum(bool(x) for x in (prompt is not None and not images, input_path, chat, images)) > 1:
        raise LlmkitError("--prompt, --input, --image and --chat exclude each other (--image takes a --prompt)")
    if output_path is not None and input_path is None:
        raise LlmkitError("--output needs --input")
    if prompt is not None:
        check_prompt(prompt, "--prompt")
    rows = None
    if input_path is not None:  # read and check the prompts before the model loads
        check_output_path(output_path)
        if image_rows(input_path, settings.image_field):
            return run_images(recipe, read_image_rows(input_path, settings), output_path, seed, attention)
        rows = read_prompts(input_path, settings.prompt_field)
    if images:
        rows = [{settings.image_field: str(path), settings.prompt_field: prompt or CAPTION_PROMPT} for path in images]
        return run_images(recipe, rows, None, seed, attention)
    # the attention plot reads the weights of a transformers model: auto picks it then
    engine = "hf" if attention is not None and settings.engine == "auto" else settings.engine
    model, tokenizer = load_generator(settings.model or None, engine=engine, threads=settings.threads,
                                      output_dir=output_dir, device=settings.device, dtype=settings.dtype)
    if isinstance(model, Ct2Model):
        if attention is not None:
            raise LlmkitError("--attention-plot needs the transformers model: --engine hf (or auto)")
        console.print(f"engine: ct2 ({model.folder})", markup=False)
    if chat:
        chat_loop(ChatSession(model, tokenizer, settings, seed=seed))
    elif rows is not None:
        run_batch(model, tokenizer, rows, output_path, settings, seed=seed, progress=console.is_terminal)
    else:
        write = lambda text: (sys.stdout.write(text), sys.stdout.flush())  # noqa: E731
        streaming = stdout.is_terminal and settings.num_return_sequences == 1 and settings.num_beams == 1
        for number, text in enumerate([prompt] if prompt is not None else settings.prompts):
            echo = "" if encoder_decoder(model) else text  # an encoder-decoder's output is all new: no prompt before it
            if streaming:
                write(echo)
            generation = generate_text(model, tokenizer, text, settings, seed=seed + number,
                                       stream=write if streaming else None)
            for continuation in generation.texts:
                write(("" if streaming else echo + continuation) + "\n")
            console.print(generation.summary(), markup=False)
            if attention is not None and number == 0:
                path = plot_generation_attention(model, tokenizer, generation.ids, attention.path, attention.layer,
                                                 attention.head)
                console.print(f"attention plot: {path}", markup=False)


# ---------------------------------------------------------------- pictures


def run_images(recipe: Recipe, rows: list[dict], output_path: Path | None, seed: int,
               attention: AttentionPlot | None) -> None:
    """Each row's picture (and prompt) through the newest vision-language model (or generate.model): one
    text per picture on stdout (after its path when there are several), or the rows with it in --output."""
    from llmkit.console import console
    from llmkit.loading import VISION_HEAD, load_model
    from llmkit.vision import describe, encoder_side, open_image, plot_image_attention

    settings = recipe.generate
    for number, row in enumerate(rows, 1):  # every picture read before the model loads
        open_image(row[settings.image_field], f"image {number}" if len(rows) > 1 else "")
    model, processor = load_model(settings.model or None, output_dir=recipe.run.output_dir, device=settings.device,
                                  dtype=settings.dtype, head=VISION_HEAD)
    images = [open_image(row[settings.image_field], side=encoder_side(processor)) for row in rows]
    texts = describe(model, processor, images, [row[settings.prompt_field] for row in rows], settings,
                     batch_size=settings.batch_size, seed=seed)
    for row, text in zip(rows, texts):
        row[settings.output_field] = text
    if output_path is not None:
        write_results(output_path, rows, settings)
    else:
        several = len(rows) > 1
        sys.stdout.write("".join((f"{row[settings.image_field]}\t" if several else "") + text + "\n"
                                 for row, text in zip(rows, texts)))
    if attention is not None:
        path = plot_image_attention(model, processor, images[0], rows[0][settings.prompt_field], texts[0],
                                    attention.path)
        console.print(f"attention plot: {path}", markup=False)


def image_rows(path: Path, image_field: str) -> bool:
    """Whether a .jsonl --input names pictures (its first row has the image field)."""
    if Path(path).suffix != ".jsonl" or not Path(path).is_file():
        return False
    first = next(iter(jsonl_values(path)), (None, None))[1]
    return isinstance(first, dict) and image_field in first


def read_image_rows(path: Path, settings: GenerateSettings) -> list[dict]:
    """Rows naming a picture (relative to the file's folder) and, optionally, a prompt (else the caption prompt)."""
    rows = []
    for where, row in jsonl_values(path):
        if not isinstance(row, dict) or not isinstance(row.get(settings.image_field), str):
            raise LlmkitError(f"{where}: expected a JSON object with an {settings.image_field!r} field naming a picture")
        picture = Path(row[settings.image_field])
        row[settings.image_field] = str(picture if picture.is_absolute() else Path(path).parent / picture)
        row.setdefault(settings.prompt_field, CAPTION_PROMPT)
        check_prompt(row[settings.prompt_field], where)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- prompt files


def read_prompts(path: str | Path, prompt_field: str = "prompt") -> list[dict]:
    """Rows of a .jsonl file (objects with a prompt field) or a .txt file (one prompt a line)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise LlmkitError(f"{path}: --input must be a .jsonl file (one JSON object a line) or .txt (one prompt a line)")
    if path.suffix == ".txt":
        rows = []
        for number, line in enumerate(read_text(path).splitlines(), 1):
            check_prompt(line, f"{path}:{number}")
            rows.append({prompt_field: line})
    else:
        rows = [check_prompt_row(row, prompt_field, where) for where, row in jsonl_values(path)]
    if not rows:
        raise LlmkitError(f"{path}: no prompts")
    return rows


def check_prompt_row(row: object, prompt_field: str, where: str) -> dict:
    if not isinstance(row, dict):
        raise LlmkitError(f"{where}: expected a JSON object with a {prompt_field!r} field")
    if prompt_field not in row:
        raise LlmkitError(f"{where}: no {prompt_field!r} field (set generate.prompt_field to use another)")
    if not isinstance(row[prompt_field], str):
        raise LlmkitError(f"{where}: {prompt_field!r} must be a string, got {row[prompt_field]!r}")
    check_prompt(row[prompt_field], where)
    return row


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

        from llmkit.console import console

        with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("generate", total=len(prompts))
            results = generate_batch(model, tokenizer, prompts, settings, seed=seed,
                                     on_batch=lambda n: bar.advance(task, n))
    else:
        results = generate_batch(model, tokenizer, prompts, settings, seed=seed)
    for row, texts in zip(rows, results):
        row[settings.output_field] = texts[0] if settings.num_return_sequences == 1 else texts
    write_results(output_path, rows, settings)
    return rows


# ---------------------------------------------------------------- chat on a terminal


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
