"""Share a model folder (a run, a quantized or a merged model) as a Hugging Face hub repository.

    from llmkit.hub import push

    pushed = push("runs/pretrain-zh-tiny", "your-name/pretrain-zh-tiny")

What only llmkit needs stays behind: checkpoints (resume state, often larger than the model), llmkit's
marker and the files and folders it is writing or swapping (llmkit.rundir), and an adapter run's merged/
(another model: push it on its own). Whatever can be refused is refused before the first request: a
folder that is not a model, a repository name the hub would not take, no token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llmkit.errors import LlmkitError, first_line
from llmkit.rundir import CHECKPOINTS, OWNER_MARK

MODEL_FILES = ("config.json", "adapter_config.json")  # a model folder has one (as llmkit.loading loads them)
LEFT_OUT = (  # huggingface_hub ignore patterns: fnmatch on the path in the folder ('*' spans '/'), "x/" = under x
    f"{CHECKPOINTS}/",  # Trainer checkpoints: what --resume needs, not the model
    "merged/",  # finetune.merge: the base with the adapter merged in, a model of its own
    OWNER_MARK, f"*/{OWNER_MARK}",  # "llmkit made this folder, --overwrite may replace it": about this disk
    ".*.tmp", "*/.*.tmp",  # a file being written (rundir.write_text: .<name>.<pid>.tmp, renamed when whole)
    "*.incoming/", "*.replaced/",  # a folder being swapped in or out (rundir.staging_for, rundir.swap_in)
)
LOG_IN = ("pass --token, set HF_TOKEN, or log in once with `hf auth login` (`huggingface-cli login` with an "
          "older huggingface_hub)")


@dataclass
class Pushed:
    url: str  # the commit on the hub
    files: list[str]  # what was uploaded, as paths in the folder (and the repository)


def push(folder: str | Path, repo: str, *, private: bool = False, token: str | None = None,
         revision: str | None = None) -> Pushed:
    """Upload `folder` to the hub repository `repo` in one commit: the repository is made if absent
    (private if asked; an existing one keeps its visibility), and so is the branch `revision`."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    files = pushed_files(folder)
    check_repo_name(repo)
    api = HfApi(token=hub_token(token))
    with hub_errors():
        api.create_repo(repo, private=private or None, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision, ignore_patterns=list(LEFT_OUT),
                                   commit_message=f"Upload {folder.resolve().name} with llmkit")
    return Pushed(commit.commit_url, files)


def pushed_files(folder: Path) -> list[str]:
    """The files of a model folder that push uploads (chosen by huggingface_hub's own filter with LEFT_OUT,
    as upload_folder chooses them); a folder that is not a model is refused."""
    from huggingface_hub.utils import filter_repo_objects

    if not folder.is_dir():
        raise LlmkitError(f"{folder}: no such folder")
    if not any((folder / name).is_file() for name in MODEL_FILES):
        hint = " (a run without its final model?)" if (folder / CHECKPOINTS).is_dir() else ""
        raise LlmkitError(f"{folder}: not a model (no {' or '.join(MODEL_FILES)}){hint}; push a run, "
                          "a quantized or a merged model folder")
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=list(LEFT_OUT)))


def check_repo_name(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise LlmkitError(f"{repo!r} is not a hub repository name (expected owner/name, e.g. "
                          "your-name/tiny-zh)") from None


def hub_token(token: str | None) -> str:
    """The token given, else the one huggingface_hub finds (HF_TOKEN, then the saved login): without one
    the hub answers 401 only after the first request, in words that do not say how to log in."""
    from huggingface_hub import get_token

    found = token or get_token()
    if not found:
        raise LlmkitError(f"no Hugging Face token: {LOG_IN}")
    return found


@contextlib.contextmanager
def hub_errors() -> Iterator[None]:
    """The hub's refusals as one line each (huggingface_hub's run to a page with a request id)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise LlmkitError("HF_HUB_OFFLINE is set: unset it to push") from None
    except HfHubHTTPError as error:
        if error.response.status_code == 401:
            raise LlmkitError(f"the hub refused the token (401): {LOG_IN}") from None
        raise LlmkitError(f"the hub refused the push: {first_line(error)}") from None
