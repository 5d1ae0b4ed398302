"""`llmkit export`: a model in another engine's format, for fast generation outside transformers.

    from llmkit.export import run

    run("runs/pretrain-zh-tiny", quantization="int8")   # -> runs/pretrain-zh-tiny/ct2

ct2 (CTranslate2, `pip install 'llmkit[fast]'`): decoder-only models (Llama, GPT-2, ...), written to
<model>/ct2 by default, where `llmkit generate` (engine auto) finds it. The conversion is
llmkit.engines.export_ct2; this module checks the arguments and writes the folder whole or not at all.
"""

from __future__ import annotations

from pathlib import Path

from llmkit.engines import EXPORT_DIR, QUANTIZATIONS, export_ct2, require_ctranslate2
from llmkit.errors import LlmkitError
from llmkit.loading import resolve_model
from llmkit.rundir import check_replaceable, claimed, locked, staging_for, swap_in

FORMATS = ("ct2",)


def run(model: str | None, output: str | Path | None = None, *, format: str = "ct2", quantization: str = "float32",
        overwrite: bool = False, output_dir: str | Path = "runs") -> Path:
    """Export `model` (None: runs/latest) to `output` (None: <model>/ct2); returns the folder written."""
    from llmkit.console import console, quiet_libraries

    quiet_libraries()
    if format not in FORMATS:
        raise LlmkitError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quantization not in QUANTIZATIONS:
        raise LlmkitError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    source = resolve_model(model, output_dir)
    if not Path(source).is_dir():
        raise LlmkitError(f"{source}: export a local model folder (download it first)")
    target = Path(output) if output is not None else Path(source) / EXPORT_DIR
    check_target(Path(source), target, overwrite)
    require_ctranslate2()
    with locked(target), claimed(staging_for(target), "export") as staging:
        with console.status(f"exporting {source} to CTranslate2 ({quantization})"):
            export_ct2(source, staging, quantization)
        if target.exists() and not overwrite:
            raise LlmkitError(f"{target} appeared while exporting; it was left alone and the export discarded")
        swap_in(staging, target)
    return target


def check_target(source: Path, target: Path, overwrite: bool) -> None:
    """The output is new (or, with --overwrite, an llmkit output), never the source nor a folder holding it;
    inside the source only as its own export folder."""
    src, out = source.resolve(), target.resolve()
    if out == src or out in src.parents:
        raise LlmkitError(f"{target}: the output cannot be the model {source} or a folder that holds it")
    if src in out.parents and out != src / EXPORT_DIR:
        raise LlmkitError(f"{target}: inside the model folder, an export goes to {source / EXPORT_DIR} only")
    if target.exists() and not overwrite:
        raise LlmkitError(f"{target} exists; pass --overwrite to replace it")
    check_replaceable(target, "output folder")
