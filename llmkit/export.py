"""`llmkit export`: a model in another engine's format, for fast generation outside transformers.

    from llmkit.export import run

    run("runs/pretrain-zh-tiny", quantization="int8")                # -> runs/pretrain-zh-tiny/ct2
    run("runs/pretrain-zh-bpe", format="gguf", quantization="q8_0")  # -> runs/pretrain-zh-bpe/gguf/model-q8_0.gguf

ct2 (CTranslate2, `pip install 'llmkit[fast]'`): decoder-only models (Llama, GPT-2, ...), written to
<model>/ct2 by default, where `llmkit generate` (engine auto) finds it; the conversion is
llmkit.engines.export_ct2. gguf (llama.cpp, Ollama, `pip install 'llmkit[gguf]'`): Llama models with a
byte-level BPE tokenizer, one file in <model>/gguf by default; the conversion is llmkit.gguf_export. This module
checks the arguments and writes the folder whole or not at all.
"""

from __future__ import annotations

from pathlib import Path

from llmkit import gguf_export
from llmkit.engines import EXPORT_DIR, export_ct2, require_ctranslate2
from llmkit.engines import QUANTIZATIONS as CT2_QUANTIZATIONS
from llmkit.errors import LlmkitError
from llmkit.loading import resolve_model
from llmkit.rundir import check_replaceable, claimed, locked, staging_for, swap_in

QUANTIZATIONS = {"ct2": CT2_QUANTIZATIONS, "gguf": gguf_export.OUTPUT_TYPES}  # each format's first is its default
EXPORT_DIRS = {"ct2": EXPORT_DIR, "gguf": gguf_export.EXPORT_DIR}  # the default output, inside the model folder


def run(model: str | None, output: str | Path | None = None, *, format: str = "ct2", quantization: str | None = None,
        overwrite: bool = False, output_dir: str | Path = "runs") -> Path:
    """Export `model` (None: runs/latest) into the folder `output` (None: <model>/<format>); returns what was
    written: the ct2 folder, or the .gguf file in its folder."""
    from llmkit.console import console, quiet_libraries

    quiet_libraries()
    if format not in QUANTIZATIONS:
        raise LlmkitError(f"--format must be one of {', '.join(QUANTIZATIONS)}, got {format!r}")
    quantization = quantization or QUANTIZATIONS[format][0]
    if quantization not in QUANTIZATIONS[format]:
        raise LlmkitError(f"--quantization for {format} must be one of {', '.join(QUANTIZATIONS[format])}, "
                          f"got {quantization!r}")
    source = resolve_model(model, output_dir)
    if not Path(source).is_dir():
        raise LlmkitError(f"{source}: export a local model folder (download it first)")
    target = Path(output) if output is not None else Path(source) / EXPORT_DIRS[format]
    check_target(Path(source), target, overwrite, EXPORT_DIRS[format])
    if format == "ct2":
        require_ctranslate2()
    else:
        gguf_export.require_gguf()
        with console.status(f"loading {source}"):
            convertible = gguf_export.load_convertible(source)  # refused before anything is written
    written = target / gguf_export.file_name(quantization) if format == "gguf" else target
    with locked(target), claimed(staging_for(target), "export") as staging:
        with console.status(f"exporting {source} to {format} ({quantization})"):
            if format == "ct2":
                export_ct2(source, staging, quantization)
            else:
                gguf_export.write_gguf(*convertible, staging / written.name, quantization, name=Path(source).name)
        if target.exists() and not overwrite:
            raise LlmkitError(f"{target} appeared while exporting; it was left alone and the export discarded")
        swap_in(staging, target)
    return written


def check_target(source: Path, target: Path, overwrite: bool, export_dir: str = EXPORT_DIR) -> None:
    """The output is new (or, with --overwrite, an llmkit output), never the source nor a folder holding it;
    inside the source only as its own export folder."""
    src, out = source.resolve(), target.resolve()
    if out == src or out in src.parents:
        raise LlmkitError(f"{target}: the output cannot be the model {source} or a folder that holds it")
    if src in out.parents and out != src / export_dir:
        raise LlmkitError(f"{target}: inside the model folder, an export goes to {source / export_dir} only")
    if target.exists() and not overwrite:
        raise LlmkitError(f"{target} exists; pass --overwrite to replace it")
    check_replaceable(target, "output folder")
