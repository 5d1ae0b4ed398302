"""Run directories, and the rules that keep what a user made safe.

runs/<name>/ holds the final model, checkpoints, metrics, recipe and provenance. Every folder llmkit makes
carries a marker file (OWNER_MARK); `--overwrite` replaces only such a folder (or an empty one), and only
once the new one is complete: the new run is written beside the old one (runs/.<name>.incoming) and
swapped in at the end, so a failed or interrupted run leaves the old one whole. One command at a time
per run (a lock the kernel releases when a process dies). Files are written whole or not at all
(temporary name, fsync, rename); a checkpoint counts only once llmkit has sealed it with the size of each
of its files, so `--resume` takes the newest one that is complete and intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator

from llmkit.errors import Interrupted, LlmkitError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OWNER_MARK = ".llmkit-output"  # in every folder llmkit made: it may replace that folder, and no other
SEAL = "llmkit-complete.json"  # in a checkpoint llmkit finished writing: each file's size
LIBRARIES = ("llmkit", "torch", "transformers", "accelerate", "datasets", "tokenizers", "peft")


# ---------------------------------------------------------------- names and ownership


def run_dir_for(output_dir: str, name: str) -> Path:
    """<output_dir>/<name> (run.name is one plain folder name: RunSettings.check)."""
    return Path(output_dir) / name


def is_owned(folder: Path) -> bool:
    """True for a folder llmkit made (it carries the marker) or an empty one: the folders it may replace."""
    return folder.is_dir() and not folder.is_symlink() and (
        (folder / OWNER_MARK).is_file() or not any(folder.iterdir()))


def check_replaceable(folder: Path, what: str = "folder") -> None:
    """Refuse to replace anything llmkit did not make, whatever its path."""
    if folder.exists() and not is_owned(folder):
        raise LlmkitError(f"{folder} is not an llmkit output (no {OWNER_MARK} in it); --overwrite replaces only "
                          f"what llmkit made: choose another {what}")


def make_owned(folder: Path, kind: str) -> None:
    """Create `folder` (and its parents) with the marker that says llmkit made it."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        raise LlmkitError(f"{folder} appeared while this command was starting (another command?)") from None
    write_json(folder / OWNER_MARK, {"made_by": "llmkit", "kind": kind,
                                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def staging_for(folder: Path) -> Path:
    """Where a replacement for `folder` is written until it is complete (the same on every rank)."""
    return folder.parent / f".{folder.name}.incoming"


def swap_in(new: Path, folder: Path) -> None:
    """Put the complete `new` folder in the place of `folder` (which llmkit made, or which is absent)."""
    old = folder.parent / f".{folder.name}.replaced"
    if old.exists():
        shutil.rmtree(old)  # left by a swap that was interrupted; it carries our marker
    if folder.exists():
        check_replaceable(folder)
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    fsync_folder(folder.parent)


def remove_owned(folder: Path) -> None:
    if folder.exists() and is_owned(folder):
        shutil.rmtree(folder)


# ---------------------------------------------------------------- one command at a time per folder


def lock_folder(folder: Path) -> int:
    """Hold an exclusive lock on `folder` (its descriptor is returned; closing it releases the lock). The
    kernel releases it when the process ends, so a crash leaves nothing stuck; a rename keeps it."""
    import fcntl

    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise LlmkitError(f"{folder} is in use by another llmkit command; wait for it to finish") from None
    return descriptor


def claim(folder: Path, kind: str) -> int:
    """Make `folder` anew for this command and lock it (see lock_folder); one that a crashed command left
    is cleared first, one that a live command holds is refused."""
    if folder.exists():
        os.close(lock_folder(folder))
        remove_owned(folder)
    make_owned(folder, kind)
    return lock_folder(folder)


@contextlib.contextmanager
def claimed(folder: Path, kind: str) -> Iterator[Path]:
    """`folder` made anew and locked while the block runs; removed if the block fails."""
    descriptor = claim(folder, kind)
    try:
        yield folder
    except BaseException:
        remove_owned(folder)
        raise
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the lock of `folder` while the block runs, if it exists (one made inside the block is claimed)."""
    descriptor = lock_folder(folder) if folder.is_dir() else None
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


# ---------------------------------------------------------------- run folders


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing run unless told how (before anything is written)."""
    if resume and overwrite:
        raise LlmkitError("--resume and --overwrite exclude each other")
    if resume:
        if last_checkpoint(run_dir) is None:
            incomplete = len(checkpoints(run_dir))
            raise LlmkitError(f"{run_dir}: no checkpoint to resume from"
                              + (f" ({incomplete} incomplete: cut short or damaged)" if incomplete else ""))
    elif run_dir.exists() and not overwrite:
        raise LlmkitError(f"{run_dir} exists; pass --overwrite to replace it, --resume to continue it, "
                          f"or set run.name")
    elif overwrite:
        check_replaceable(run_dir, "run.name or run.output_dir")


class RunFolder:
    """A training run's folder while a command writes it:

        with RunFolder(run_dir, overwrite, resume) as folder:
            ...                     # check the input: nothing is written yet
            folder.start(recipe_toml, provenance)   # main process: the folder is made (and locked)
            ...                     # train and finish in folder.work_dir

    `work_dir` is the run itself, or with --overwrite a new folder beside it that replaces it only when the
    block ends without an error; a failed or interrupted replacement is discarded and the old run stays."""

    def __init__(self, run_dir: Path, overwrite: bool, resume: bool):
        check_run_dir(run_dir, overwrite, resume)
        self.run_dir = run_dir
        self.work_dir = staging_for(run_dir) if overwrite else run_dir
        self.main = int(os.environ.get("RANK", "0")) == 0
        self.locks: list[int] = []

    def __enter__(self) -> "RunFolder":
        if self.main and self.run_dir.is_dir():  # --resume, --overwrite: refused while another command runs on it
            self.locks.append(lock_folder(self.run_dir))
        return self

    def start(self, recipe_toml: str, provenance: dict) -> None:
        """Make the folder (main process only) with its marker, the resolved recipe and the provenance."""
        self.locks.append(claim(self.work_dir, "run") if self.replacing else self.make_run_dir())
        (self.work_dir / CHECKPOINTS).mkdir(exist_ok=True)
        write_text(self.work_dir / "recipe.toml", recipe_toml)
        write_json(self.work_dir / "provenance.json", provenance)

    def make_run_dir(self) -> int:
        make_owned(self.run_dir, "run")  # refused if another command made it since the check
        return lock_folder(self.run_dir)

    @property
    def replacing(self) -> bool:
        return self.work_dir != self.run_dir

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if self.main and self.replacing:
                if kind is None:
                    swap_in(self.work_dir, self.run_dir)
                else:
                    remove_owned(self.work_dir)
        finally:
            for descriptor in self.locks:
                os.close(descriptor)
        if self.replacing and isinstance(error, Interrupted):
            raise Interrupted(f"the new run was discarded; {self.run_dir} is as it was") from None


# ---------------------------------------------------------------- checkpoints


def seal_checkpoint(folder: Path) -> None:
    """Mark a checkpoint complete: written after its files are on disk, with each one's size."""
    sizes = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != SEAL):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        sizes[path.name] = path.stat().st_size
    write_json(folder / SEAL, {"files": sizes})


def is_complete(folder: Path) -> bool:
    """Sealed, and every file still there with the size it was written with (a file lost or cut short
    since makes the checkpoint incomplete)."""
    try:
        sizes = json.loads((folder / SEAL).read_text(encoding="utf-8"))["files"]
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    found = [p for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint."""
    return next((p for p in checkpoints(run_dir) if is_complete(p)), None)


def skipped_checkpoints(run_dir: Path) -> list[Path]:
    """Incomplete checkpoints newer than the newest complete one (cut short by a crash, or damaged)."""
    newest = last_checkpoint(run_dir)
    step = int(newest.name.split("-")[-1]) if newest else -1
    return [p for p in checkpoints(run_dir) if int(p.name.split("-")[-1]) > step]


# ---------------------------------------------------------------- runs/latest


def latest_name(head: str = "causal-lm") -> str:
    """The pointer to the newest model with `head` (llmkit.tasks.HEADS): `latest` for language models that
    generate, `latest-<head>` for the others, so that a classifier never becomes what `generate` runs."""
    return LATEST if head == "causal-lm" else f"{LATEST}-{head}"


def point_latest(run_dir: Path, head: str = "causal-lm") -> None:
    """Make <output_dir>/latest (or latest-<head>) point at this run, so that commands default to the
    newest model of the kind they use. Only a link (or llmkit's pointer file) is replaced; a file or folder of
    that name that a user made stays."""
    link = run_dir.parent / latest_name(head)
    if link.exists() and not link.is_symlink() and not is_latest_pointer(link):
        return
    temporary = run_dir.parent / f".{link.name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    try:
        temporary.symlink_to(run_dir.name, target_is_directory=True)
    except OSError:  # no symlinks (some Windows set-ups): a file naming the run
        temporary.write_text(run_dir.name + "\n", encoding="utf-8")
    os.replace(temporary, link)


def is_latest_pointer(path: Path) -> bool:
    """A file that llmkit wrote in place of the `latest` link: one line naming a run folder it made."""
    try:
        text = path.read_text(encoding="utf-8") if path.stat().st_size < 1024 else ""
    except (OSError, UnicodeDecodeError):
        return False
    name = text.strip()
    return bool(name) and "\n" not in name and (path.parent / name / OWNER_MARK).is_file()


# ---------------------------------------------------------------- files written whole


def write_text(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file beside it, flushed to disk, renamed into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_text(path: Path) -> str:
    """A whole file as UTF-8, or an error naming the file and the first line that is not."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise LlmkitError(f"{path}: cannot read: {error.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise LlmkitError(f"{path}:{line}: not UTF-8 text") from None


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, line) of each line of a UTF-8 file, read as they are asked for (a corpus larger than memory
    is never read whole), each line cut after "\n" and kept with it; a line that is not UTF-8 is an error
    naming the file and the line."""
    try:
        file = path.open("rb")
    except OSError as error:
        raise LlmkitError(f"{path}: cannot read: {error.strerror}") from None
    with file:
        for number, raw in enumerate(file, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LlmkitError(f"{path}:{number}: not UTF-8 text") from None


def jsonl_values(path: Path, torn_end: bool = False) -> list[tuple[str, object]]:
    """(where, value) of each non-empty line of a JSONL file, `where` naming the file and line (jsonl_lines)."""
    return list(jsonl_lines(path, torn_end))


def jsonl_lines(path: Path, torn_end: bool = False) -> Iterator[tuple[str, object]]:
    """(where, value) of each non-empty line of a JSONL file, read as they are asked for, `where` naming the
    file and line. A line that is not JSON is an error naming them; with `torn_end`, a last line cut short by a
    crash (no line break after it: a file llmkit appends to) is left out instead. Lines end at "\n" only (not
    splitlines: JSON text may hold U+2028)."""
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            if torn_end and not line.endswith("\n"):
                return
            raise LlmkitError(f"{path}:{number}: not a JSON object") from None
        yield f"{path}:{number}", value


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file llmkit appends to (none when it is absent); a last line torn by a crash is
    left out."""
    return [row for _, row in jsonl_values(path, torn_end=True)] if path.exists() else []


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop rows logged after the checkpoint: they are about to be redone."""
    rows = [row for row in read_jsonl(path) if row.get("step", 0) <= after_step]
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------- provenance


def provenance(data_fingerprint: str, world_size: int, record_host: bool = False) -> dict:
    """How this run was made: versions, code commit, data, command line; the machine's name only when asked
    (run.record_host): a run shared on the hub should not say where it was made."""
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
    } | ({"host": platform.node()} if record_host else {})


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
