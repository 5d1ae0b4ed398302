"""Run directories: runs/<name>/ holds the final model, checkpoints, metrics, recipe and provenance.

Nothing is overwritten unless asked: an existing run is refused without --overwrite, and --resume
continues it from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from llmkit.errors import LlmkitError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
LIBRARIES = ("llmkit", "torch", "transformers", "accelerate", "datasets", "tokenizers", "peft")


def run_dir_for(output_dir: str, name: str) -> Path:
    return Path(output_dir) / name


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing run unless told how (before anything is written)."""
    if resume and overwrite:
        raise LlmkitError("--resume and --overwrite exclude each other")
    if resume:
        if last_checkpoint(run_dir) is None:
            raise LlmkitError(f"{run_dir}: no checkpoint to resume from")
    elif run_dir.exists() and not overwrite:
        raise LlmkitError(f"{run_dir} exists; pass --overwrite to replace it, --resume to continue it, "
                          f"or set run.name")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory (main process only), clearing an old run when --overwrite was given."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)


def last_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [p for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)


def point_latest(run_dir: Path) -> None:
    """Make <output_dir>/latest point at this run, so that commands can default to the newest model."""
    link = run_dir.parent / LATEST
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        return  # a real run named "latest": leave it alone
    try:
        link.symlink_to(run_dir.name, target_is_directory=True)
    except OSError:  # no symlinks (some Windows set-ups): a file naming the run
        link.write_text(run_dir.name + "\n", encoding="utf-8")


def provenance(data_fingerprint: str, world_size: int) -> dict:
    """How this run was made: versions, code commit, data, command line."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": versions,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "data_fingerprint": data_fingerprint,
        "world_size": world_size,
        "host": platform.node(),
    }


def git_commit() -> str | None:
    """The commit of the code llmkit runs from (with '+dirty' when it has changes), if in git."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop rows logged after the checkpoint: they are about to be redone."""
    rows = [row for row in read_jsonl(path) if row.get("step", 0) <= after_step]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
