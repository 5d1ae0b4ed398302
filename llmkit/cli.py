"""The `llmkit` command: thin Typer commands that load a recipe and call a task's run().

Heavy libraries (torch, transformers, datasets) are imported inside the commands, so that
`llmkit --help` answers at once.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from llmkit.errors import Interrupted, LlmkitError

app = typer.Typer(
    help="From raw text to a trained, compressed, evaluated language model.\n\n"
         "Quick start: llmkit pretrain pretrain-zh-tiny",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="List, copy, check and show recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
debug_mode = {"on": False}

RecipeArg = typer.Argument(..., help="Recipe file, or the name of a shipped recipe (see `llmkit recipe list`).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing run that llmkit made, once the new "
                                                        "one is complete.")
ResumeOpt = typer.Option(False, "--resume", help="Continue the run from its newest complete checkpoint.")
ForceOpt = typer.Option(False, "--force", help="With --resume: accept a recipe that differs from the run's.")
SetOpt = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                      help="Override a recipe key, e.g. --set train.learning_rate=3e-4 (repeatable).")
EngineOpt = typer.Option(None, "--engine", help="hf (transformers), ct2 (the model's CTranslate2 export, "
                                                "see `llmkit export`) or auto (the export when there is one).")
ThreadsOpt = typer.Option(None, "--threads", help="Intra-op CPU threads of the engine (default: the library's).")


def table_options(table: str, options: dict) -> dict:
    """A command's options as recipe keys of `table` (None = not given), for load_recipe."""
    return {f"{table}.{key}": value for key, value in options.items()}


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
                 version: bool = typer.Option(False, "--version", is_eager=True, callback=lambda given: show_version(given),
                                              help="Print llmkit's version and exit.")) -> None:
    debug_mode["on"] = debug


def show_version(given: bool) -> None:
    if given:
        from llmkit import __version__

        typer.echo(f"llmkit {__version__}")
        raise typer.Exit()


@contextlib.contextmanager
def reporting_errors() -> Iterator[None]:
    """Expected failures become one line on stderr and a stable exit status."""
    from llmkit.console import console

    try:
        yield
    except LlmkitError as error:
        if debug_mode["on"]:
            raise
        console.print(f"error: {error}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    except Interrupted as stop:
        console.print(f"stopped: {stop}", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        console.print("stopped by Ctrl-C", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - anything else is a failure, shown without traceback
        if debug_mode["on"]:
            raise
        console.print(f"failed: {type(error).__name__}: {error} (run with --debug for the traceback)",
                            markup=False)
        raise typer.Exit(EXIT_FAILED)


@app.command(epilog="Examples:\n\n  llmkit pretrain pretrain-zh-tiny\n\n"
                    "  llmkit pretrain recipes/pretrain-zh-small.toml --set train.max_steps=100 --overwrite\n\n"
                    "  torchrun --nproc_per_node 2 -m llmkit pretrain pretrain-zh-tiny")
def pretrain(recipe: str = RecipeArg, sets: List[str] = SetOpt, overwrite: bool = OverwriteOpt,
             resume: bool = ResumeOpt, force: bool = ForceOpt):
    """Train a tokenizer and a causal or masked language model from scratch, or continue one."""
    with reporting_errors():
        from llmkit.recipe import load_recipe

        settings = load_recipe(recipe, sets)
        from llmkit import pretrain as task

        task.run(settings, overwrite=overwrite, resume=resume, force=force)


@app.command(epilog="Examples:\n\n  llmkit generate --prompt 昨天天气很\n\n"
                    "  llmkit generate --model runs/pretrain-zh-tiny --prompt 今天 --stop 。 --seed 1\n\n"
                    "  llmkit generate pretrain-zh-tiny --input prompts.jsonl --output results.jsonl\n\n"
                    "  llmkit generate --chat\n\n"
                    "  llmkit generate --image cat.png --prompt 图中有几个圆？ --attention-plot look.png")
def generate(
        recipe: Optional[str] = typer.Argument(None, help="Recipe whose [generate] table gives defaults."),
        sets: List[str] = SetOpt,
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue."),
        model: Optional[str] = typer.Option(None, "--model", "-m",
                                            help="Run, model or adapter directory, or hub id (default: runs/latest)."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="0 = greedy."),
        top_k: Optional[int] = typer.Option(None, "--top-k"),
        top_p: Optional[float] = typer.Option(None, "--top-p"),
        repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
        num_return_sequences: Optional[int] = typer.Option(None, "--num-return-sequences", "-n"),
        greedy: bool = typer.Option(False, "--greedy", help="Take the likeliest token each step."),
        num_beams: Optional[int] = typer.Option(None, "--num-beams"),
        seed: Optional[int] = typer.Option(None, "--seed", help="Same seed, same text (default: run.seed)."),
        stop: List[str] = typer.Option([], "--stop", help="Stop at this string and cut it off (repeatable)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cuda, mps or cpu."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, float32, bfloat16 or float16."),
        input_path: Optional[Path] = typer.Option(None, "--input", "-i", help="Prompts: .jsonl or .txt (one a line)."),
        output_path: Optional[Path] = typer.Option(None, "--output", "-o",
                                                   help="Results for --input: .jsonl or .txt (default: stdout)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        chat: bool = typer.Option(False, "--chat", help="Interactive chat (/reset, /exit, Ctrl-D)."),
        attention_plot: Optional[Path] = typer.Option(None, "--attention-plot",
                                                      help="Write a heatmap of attention over the text (PNG)."),
        attention_layer: Optional[int] = typer.Option(None, "--attention-layer", help="Plot only this layer."),
        attention_head: Optional[int] = typer.Option(None, "--attention-head", help="Plot this head, not the mean."),
        images: List[Path] = typer.Option([], "--image", help="A picture for a vision-language model (repeatable); "
                                          "--prompt asks about it (default: 描述这张图片：)."),
        engine: Optional[str] = EngineOpt,
        threads: Optional[int] = ThreadsOpt,
):
    """Write text with a trained model, streaming it as it is made; or about pictures (--image)."""
    with reporting_errors():
        from llmkit.recipe import load_recipe

        options = {"model": model, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                   "top_p": top_p, "repetition_penalty": repetition_penalty,
                   "num_return_sequences": num_return_sequences, "greedy": greedy or None, "num_beams": num_beams,
                   "stop": stop or None, "device": device, "dtype": dtype, "batch_size": batch_size,
                   "engine": engine, "threads": threads}
        settings = load_recipe(recipe, sets, options=table_options("generate", options))
        from llmkit import generate as task

        task.run(settings, seed=seed, prompt=prompt, input_path=input_path, output_path=output_path, chat=chat,
                 attention=task.AttentionPlot(attention_plot, attention_layer, attention_head) if attention_plot else None,
                 images=images)


@app.command("eval", epilog="Examples:\n\n  llmkit eval eval-ppl\n\n"
                            "  llmkit eval eval-ppl --model runs/pretrain-zh-tiny --model runs/pretrain-zh-small\n\n"
                            "  llmkit eval my-tasks.toml --limit 100 --set eval.output=quick.json")
def eval_command(recipe: str = RecipeArg, sets: List[str] = SetOpt,
                 models: List[str] = typer.Option([], "--model", "-m",
                                                  help="Model to score instead of the recipe's (repeatable)."),
                 limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N examples."),
                 engine: Optional[str] = typer.Option(None, "--engine", help="For perplexity and generation tasks: "
                                                      "hf, ct2 or auto, as in `llmkit generate`; other tasks use hf."),
                 threads: Optional[int] = ThreadsOpt):
    """Score models on tasks side by side: perplexity, accuracy/F1, entity F1, EM, BLEU."""
    with reporting_errors():
        from llmkit.recipe import load_recipe

        settings = load_recipe(recipe, sets, options=table_options("eval", {"engine": engine, "threads": threads}))
        if limit is not None and limit < 1:
            raise LlmkitError(f"--limit must be at least 1, got {limit}")
        from llmkit import evaluate as task

        task.run(settings, models=models or None, limit=limit)


@app.command(epilog="Examples:\n\n  llmkit finetune classify\n\n"
                    "  llmkit finetune classify-qlora --set finetune.merge=true\n\n"
                    "  llmkit finetune ner --set model.path=runs/pretrain-zh-tiny --set train.epochs=1\n\n"
                    "  llmkit finetune caption")
def finetune(recipe: str = RecipeArg, sets: List[str] = SetOpt, overwrite: bool = OverwriteOpt,
             resume: bool = ResumeOpt, force: bool = ForceOpt,
             merge: bool = typer.Option(False, "--merge", help="Also save the base with the LoRA/DoRA/QLoRA adapter "
                                                               "merged in (<run>/merged), as finetune.merge = true.")):
    """Adapt a model to a task: classification, token classification, extractive QA or instruction
    tuning, by full tuning, LoRA, DoRA, QLoRA, prompt or prefix tuning (with optional distillation)."""
    with reporting_errors():
        from llmkit.recipe import load_recipe

        settings = load_recipe(recipe, sets, options=table_options("finetune", {"merge": merge or None}))
        from llmkit import finetune as task

        task.run(settings, overwrite=overwrite, resume=resume, force=force)


@app.command(epilog="Examples:\n\n  llmkit plan pretrain-zh-tiny\n\n"
                    "  llmkit plan pretrain-gpu-llama --nproc 8 --set distributed.strategy=fsdp\n\n"
                    "  llmkit plan classify --json > plan.json")
def plan(recipe: str = RecipeArg, sets: List[str] = SetOpt,
         nproc: Optional[int] = typer.Option(None, "--nproc", help="Processes the run will have (default: "
                                                                   "$WORLD_SIZE, else 1)."),
         steps: int = typer.Option(10, "--steps", help="Training steps to time here (0: none)."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table.")):
    """Before a long run: parameters, memory per device, tokens, and the wall time measured on a few steps."""
    with reporting_errors():
        from llmkit.recipe import load_recipe

        settings = load_recipe(recipe, sets)
        if steps < 0:
            raise LlmkitError(f"--steps must be 0 or more, got {steps}")
        from llmkit import plan as task
        from llmkit.console import stdout

        result = task.run(settings, task.command_of(recipe), processes=nproc, measure_steps=steps)
        if as_json:
            typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
        else:
            task.show(result, stdout)


@app.command(epilog="Examples:\n\n  llmkit quantize quantize-nf4\n\n"
                    "  llmkit quantize --model runs/pretrain-zh-tiny --method nf4 --output runs/tiny-nf4\n\n"
                    "  llmkit quantize prune --set quantize.structure=mlp-units --set quantize.sparsity=0.25")
def quantize(recipe: Optional[str] = typer.Argument(None, help="Recipe with a quantize table (e.g. quantize-nf4)."),
             sets: List[str] = SetOpt,
             model: Optional[str] = typer.Option(None, "--model", "-m",
                                                 help="Model to compress: run, model dir or hub id (default: runs/latest)."),
             method: Optional[str] = typer.Option(None, "--method",
                                                  help="bnb-int8, bnb-nf4 (nf4), bnb-fp4 (fp4), dynamic-int8 or prune."),
             output: Optional[str] = typer.Option(None, "--output", "-o", help="Folder for the compressed model."),
             sparsity: Optional[float] = typer.Option(None, "--sparsity", help="prune: share removed, in (0, 1)."),
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace an output folder that llmkit "
                                                                     "made, once the new one is complete.")):
    """Compress a model (bitsandbytes int8/NF4/FP4, dynamic int8, pruning) and report what it cost."""
    with reporting_errors():
        from llmkit.recipe import load_recipe
        from llmkit.quantize import METHOD_ALIASES

        options = {"model": model, "method": METHOD_ALIASES.get(method, method), "output": output,
                   "sparsity": sparsity}
        settings = load_recipe(recipe, sets, options=table_options("quantize", options))
        from llmkit import quantize as task

        task.run(settings, overwrite=overwrite)


@app.command(epilog="Examples:\n\n  llmkit serve --model runs/pretrain-zh-tiny\n\n"
                    "  llmkit serve pretrain-zh-tiny --port 8080 --api-key secret\n\n"
                    "  llmkit serve --host 0.0.0.0 --max-queue 128 --log-requests")
def serve(recipe: Optional[str] = typer.Argument(None, help="Recipe whose \\[generate] table gives the defaults."),
          sets: List[str] = SetOpt,
          model: Optional[str] = typer.Option(None, "--model", "-m",
                                              help="Run, model or adapter directory, or hub id (default: runs/latest)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
          port: int = typer.Option(8000, "--port"),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LLMKIT_API_KEY",
                                                help="Answer 401 to /v1 requests without 'Authorization: Bearer KEY'."),
          max_tokens: int = typer.Option(1024, "--max-tokens", help="The most new tokens a request may ask for."),
          max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait; more are answered 429."),
          max_batch: int = typer.Option(16, "--max-batch", help="Waiting requests generated together, at most."),
          batch_wait: float = typer.Option(0.02, "--batch-wait",
                                           help="Seconds a batch waits for more requests while fewer wait than were in flight lately."),
          stream_interval: float = typer.Option(0.02, "--stream-interval",
                                                help="Seconds of text in one streamed chunk (0: a chunk a token)."),
          batching: str = typer.Option("dynamic", "--batching",
                                       help="dynamic: waiting requests share a generate call; continuous: requests "
                                            "join the running batch at each step (transformers', hf engine)."),
          timeout: float = typer.Option(300, "--timeout", help="Seconds a request may take, queue included (504)."),
          max_body: int = typer.Option(1_000_000, "--max-body", help="Largest request body, bytes (413)."),
          log_requests: bool = typer.Option(False, "--log-requests", help="A line per request on stdout."),
          engine: Optional[str] = EngineOpt,
          threads: Optional[int] = ThreadsOpt):
    """Serve a model over the OpenAI API (completions, chat, streaming), with a chat page at /."""
    with reporting_errors():
        from llmkit.recipe import load_recipe

        options = {"model": model, "engine": engine, "threads": threads}
        settings = load_recipe(recipe, sets, options=table_options("generate", options))
        from llmkit import serve as task

        task.run(settings, host=host, port=port, api_key=api_key, log_requests=log_requests, max_tokens=max_tokens,
                 max_queue=max_queue, max_batch=max_batch, batch_wait=batch_wait,
                 stream_interval=stream_interval, timeout=timeout, max_body=max_body, batching=batching)


@app.command(epilog="Examples:\n\n  llmkit export --format ct2 runs/pretrain-zh-tiny\n\n"
                    "  llmkit export --format ct2 runs/pretrain-zh-tiny runs/tiny-ct2-int8 --quantization int8\n\n"
                    "  llmkit export --format gguf runs/pretrain-zh-bpe --quantization q8_0")
def export(model: Optional[str] = typer.Argument(None, help="Run, model or adapter folder (default: runs/latest)."),
           output: Optional[Path] = typer.Argument(None, help="Folder to write (default: MODEL/ct2, where "
                                                             "`llmkit generate` finds it, or MODEL/gguf)."),
           format: str = typer.Option("ct2", "--format", help="ct2: CTranslate2 (pip install 'llmkit\\[fast]'); "
                                                              "gguf: llama.cpp and Ollama, Llama models with a "
                                                              "byte-level BPE tokenizer (pip install 'llmkit\\[gguf]')."),
           quantization: Optional[str] = typer.Option(None, "--quantization", help="ct2: float32 (default), int8 or "
                                                      "int16 (CPU), float16, bfloat16 (GPU); gguf: f16 (default), "
                                                      "f32, bf16, q8_0."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace an export that llmkit made.")):
    """Convert a causal language model for a fast engine: CTranslate2 (`llmkit generate --engine ct2`) or
    llama.cpp/Ollama (GGUF)."""
    with reporting_errors():
        from llmkit import export as task

        written = task.run(model, output, format=format, quantization=quantization, overwrite=overwrite)
        typer.echo(f"exported to {written} ({format}, {quantization or task.QUANTIZATIONS[format][0]})")


@app.command(epilog="Examples:\n\n  llmkit push runs/pretrain-zh-tiny your-name/pretrain-zh-tiny\n\n"
                    "  llmkit push runs/classify/merged your-name/classify-zh --private --revision v1")
def push(run: Path = typer.Argument(..., help="Run, quantized or merged model folder."),
         repo: str = typer.Argument(..., help="Hub repository (owner/name); made if absent."),
         private: bool = typer.Option(False, "--private", help="Make the repository private (when it is made)."),
         token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN, or the saved login)."),
         revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to; made if absent "
                                                                         "(default: main).")):
    """Upload a model to the Hugging Face hub: its weights, tokenizer, card and reports, without checkpoints
    and llmkit's own files."""
    with reporting_errors():
        from llmkit.hub import push as push_folder

        pushed = push_folder(run, repo, private=private, token=token, revision=revision)
        typer.echo(f"pushed {len(pushed.files)} files of {run} to {pushed.url}")


@recipe_app.command("list")
def recipe_list():
    """List the shipped recipes."""
    from llmkit.recipe import recipe_summary, shipped_recipe_names, shipped_recipes_dir

    for name in shipped_recipe_names():
        typer.echo(f"{name:24} {recipe_summary(shipped_recipes_dir() / f'{name}.toml')}")


@recipe_app.command("copy")
def recipe_copy(name: str = typer.Argument(..., help="Shipped recipe name."),
                destination: Path = typer.Argument(Path("."), help="File or folder to copy to."),
                overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file.")):
    """Copy a shipped recipe to edit it."""
    with reporting_errors():
        from llmkit.recipe import copy_recipe

        typer.echo(f"copied to {copy_recipe(name, destination, overwrite)}")


@recipe_app.command("check")
def recipe_check(recipe: str = RecipeArg, sets: List[str] = SetOpt):
    """Validate a recipe without running it."""
    with reporting_errors():
        from llmkit.recipe import load_recipe

        load_recipe(recipe, sets)
        typer.echo(f"{recipe}: ok")


@recipe_app.command("keys")
def recipe_keys(table: Optional[str] = typer.Argument(None, help="Only this table (run, model, train, ...)."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List every recipe key with its type, default and what it does."""
    with reporting_errors():
        from llmkit.recipe import recipe_keys as keys_of

        keys = keys_of(table)
        if as_json:
            typer.echo(json.dumps([vars(key) for key in keys], ensure_ascii=False, indent=2, default=str))
            return
        from rich.table import Table

        from llmkit.console import stdout

        listing = Table("key", "type", "default", "what it does", title="recipe keys", show_lines=False)
        for key in keys:
            default = "unset" if key.default is None else json.dumps(key.default, ensure_ascii=False)
            listing.add_row(key.name, key.type, default, key.comment)
        stdout.print(listing)


@recipe_app.command("show")
def recipe_show(recipe: Optional[str] = typer.Argument(None, help="Recipe file or shipped name; none = defaults."),
                sets: List[str] = SetOpt,
                as_json: bool = typer.Option(False, "--json", help="Print JSON instead of TOML.")):
    """Print the fully resolved recipe (defaults, extends and overrides applied)."""
    with reporting_errors():
        from llmkit.recipe import load_recipe, recipe_to_dict, recipe_to_toml

        settings = load_recipe(recipe, sets)
        typer.echo(json.dumps(recipe_to_dict(settings), ensure_ascii=False, indent=2) if as_json
                   else recipe_to_toml(settings))


def main() -> None:
    app(prog_name="llmkit")
