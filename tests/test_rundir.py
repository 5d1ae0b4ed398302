"""Reliability of run folders (llmkit.rundir): nothing a user made is ever lost.

Each command case runs the CLI in a throw-away folder that holds sentinels (a README.md, other files, a
folder with a file, another run) and checks the exit status, that stderr is one line naming the problem,
and that every sentinel survived byte-identical. The kill tests SIGKILL tiny training runs at precise
points (a driver script injects a TrainerCallback into llmkit.pretrain.run) and check that `--resume`
gives the weights of an uninterrupted run, tensor for tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmkit import rundir
from llmkit.errors import LlmkitError
from tests.conftest import TINY, problems

pytestmark = pytest.mark.slow
LLMKIT = [sys.executable, "-m", "llmkit"]
# The shared recipe: 6 steps, a checkpoint after every step (the newest 4 kept: 3, 4, 5, 6), evaluations at 3 and 6.
# Precision pinned: "auto" times a bf16 matmul at each start, so on busy cores a resumed run may train in
# another precision than the run it continues (a difference these tests are not about).
FAST = [*TINY, "train.precision=fp32"]
REFERENCE = [*FAST, "train.save_every=1", "train.keep_checkpoints=4"]
PRETRAIN = ["pretrain", "pretrain-zh-tiny"]


# ---------------------------------------------------------------- helpers


def sets(overrides) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def cache_env(tmp_path_factory) -> dict:
    """The environment of every command: offline, and the block cache the conftest fixture gives the tests."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "LLMKIT_CACHE": str(tmp_path_factory.getbasetemp() / "llmkit-cache")}


@pytest.fixture
def env(tmp_path_factory) -> dict:
    return cache_env(tmp_path_factory)


def llmkit(cwd: Path, env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*LLMKIT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def driven(cwd: Path, env: dict, hook: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The CLI run by the driver script, with `hook` (see DRIVER) injected into the run."""
    driver = cwd / "llmkit_driver.py"
    if not driver.exists():
        driver.write_text(DRIVER, encoding="utf-8")
    return subprocess.run([sys.executable, str(driver), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**env, "RUNDIR_TEST_HOOK": json.dumps(hook)})


def one_line(result: subprocess.CompletedProcess) -> str:
    """Beside llmkit's progress (a run may have trained before it stopped), stderr must be exactly one line
    (the problem, named); it is returned."""
    lines = problems(result.stderr)
    assert len(lines) == 1, f"stderr is not one line:\n{result.stderr}\nstdout:\n{result.stdout[-3000:]}"
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every entry under root: files by content, links by target, folders by name (links not followed)."""
    tree = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                tree[key] = "link -> " + os.readlink(path)
            elif path.is_file():
                tree[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                tree[key] = "folder"
    return tree


def assert_survived(root: Path, before: dict) -> None:
    now = snapshot(root)
    lost = sorted(key for key in before if key not in now)
    changed = sorted(key for key in before if key in now and now[key] != before[key])
    assert not lost and not changed, f"lost: {lost}; changed: {changed}"


def plant(root: Path, reference: Path | None = None) -> dict:
    """Sentinels a user made: a README.md, other files, folders with files, and another run."""
    files = {"README.md": "# my project\n\nmy notes: do not lose\n", "notes.txt": "unsaved thoughts\n",
             "data/corpus.txt": "我的数据，一行一个文档\n", "docs/guide/index.md": "# guide\n",
             "package.json": '{"name": "mine"}\n'}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    if reference is not None:
        shutil.copytree(reference, root / "runs" / "other", symlinks=True)
    return snapshot(root)


def copy_run(reference: Path, destination: Path) -> Path:
    shutil.copytree(reference, destination, symlinks=True)
    return destination


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    differ = {k: float((first[k].float() - second[k].float()).abs().max()) for k in first
              if not torch.equal(first[k], second[k])}
    assert not differ, f"tensors that differ from the uninterrupted run (max abs difference): {differ}"


def losses(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(row["step"], row[key]) for row in rows if key in row]


def sealed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[-1]) for p in rundir.checkpoints(run_dir) if rundir.is_complete(p))


# A driver for precise kill points: the llmkit CLI, with a TrainerCallback added to llmkit.pretrain.run's.
# Callbacks given to run() are registered with the Trainer before train_resumably adds StopOnInterrupt and
# SealCheckpoints, so this one's on_save runs BEFORE the checkpoint is sealed (the driver prints whether the
# seal exists when it acts, and the tests check it).
DRIVER = r'''
import io, json, os, signal, sys, time
from pathlib import Path

import llmkit  # first, as `python -m llmkit` does: it quiets a library notice at import
import llmkit.pretrain
import torch
from transformers import TrainerCallback

HOOK = json.loads(os.environ["RUNDIR_TEST_HOOK"])
AT, STEP, ACTION = HOOK["at"], HOOK.get("step"), HOOK.get("action")


def act(what):
    print(f"hook: {what}", flush=True)
    if ACTION == "raise":
        raise RuntimeError("loss is nan (injected failure)")
    os.kill(os.getpid(), getattr(signal, ACTION))
    if ACTION == "SIGKILL":
        time.sleep(60)


class Hook(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):  # step STEP is done (and saved, sealed)
        if AT == "step_begin" and state.global_step == STEP:
            act(f"step_begin after step {STEP}")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # mid-step: gradients, no update yet
        if AT == "pre_optimizer" and state.global_step + 1 == STEP:
            act(f"pre_optimizer in step {STEP}")

    def on_save(self, args, state, control, **kwargs):  # Trainer wrote checkpoint-STEP; not sealed yet
        if AT == "save" and state.global_step == STEP:
            folder = Path(args.output_dir) / f"checkpoint-{STEP}"
            act(f"on_save checkpoint-{STEP} sealed={(folder / 'llmkit-complete.json').exists()} "
                f"files={sorted(p.name for p in folder.iterdir())}")


if AT == "torn":  # checkpoint-STEP's optimizer.pt is half written when the process dies
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).name == "optimizer.pt" \
                and Path(f).parent.name == f"checkpoint-{STEP}":
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            act(f"torn {f} ({len(data) // 2} of {len(data)} bytes)")
        return real_save(obj, f, *args, **kwargs)

    torch.save = save

if AT == "quantize_appears":  # someone makes the output folder while quantize runs
    import llmkit.quantize as quantize

    compress_and_measure = quantize.compress_and_measure

    def appears(source, staging, output, *args, **kwargs):
        report = compress_and_measure(source, staging, output, *args, **kwargs)
        Path(output).mkdir(parents=True)
        (Path(output) / "mine.txt").write_text("made by someone else\n", encoding="utf-8")
        print(f"hook: made {output}", flush=True)
        return report

    quantize.compress_and_measure = appears

original_run = llmkit.pretrain.run


def run(*args, callbacks=None, **kwargs):
    return original_run(*args, callbacks=[*(callbacks or []), Hook()], **kwargs)


llmkit.pretrain.run = run

from llmkit.cli import main

sys.argv = ["llmkit", *sys.argv[1:]]
main()
'''


# ---------------------------------------------------------------- the shared uninterrupted run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted tiny run (REFERENCE): runs/tiny with checkpoints 3-6 and the final model."""
    root = tmp_path_factory.mktemp("reference")
    result = llmkit(root, cache_env(tmp_path_factory), *PRETRAIN, *sets([*REFERENCE, "run.name=tiny"]))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = root / "runs" / "tiny"
    assert sealed_steps(run_dir) == [3, 4, 5, 6]
    return run_dir


# ---------------------------------------------------------------- rundir, in process


@pytest.mark.parametrize("name", ['""', ".", "..", "a/b", "../escape", "/abs", ".hidden", "a\\b"])
def test_a_recipe_refuses_a_run_name_that_is_not_one_plain_folder(name):
    from llmkit import load_recipe

    with pytest.raises(LlmkitError, match="run.name must be one plain folder name"):
        load_recipe("pretrain-zh-tiny", [f"run.name={name}"])


def test_run_dir_for_puts_a_plain_name_under_the_output_dir():
    from llmkit import load_recipe

    recipe = load_recipe("pretrain-zh-tiny", ["run.name=tiny-2.0_x", "run.output_dir=/somewhere/runs"])
    assert rundir.run_dir_for(recipe.run.output_dir, recipe.run.name) == Path("/somewhere/runs/tiny-2.0_x")


def test_only_marked_or_empty_folders_are_replaceable(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "x.txt").write_text("x")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    rundir.make_owned(tmp_path / "made", "run")
    (tmp_path / "link").symlink_to(tmp_path / "made", target_is_directory=True)
    assert rundir.is_owned(tmp_path / "made") and rundir.is_owned(tmp_path / "empty")
    for name in ("mine", "file.txt", "link"):
        assert not rundir.is_owned(tmp_path / name)
        with pytest.raises(LlmkitError, match="is not an llmkit output"):
            rundir.check_replaceable(tmp_path / name)
    rundir.check_replaceable(tmp_path / "absent")
    rundir.remove_owned(tmp_path / "mine")
    rundir.remove_owned(tmp_path / "link")
    assert (mine / "sub" / "x.txt").read_text() == "x" and (tmp_path / "made" / rundir.OWNER_MARK).is_file()
    with pytest.raises(LlmkitError, match="appeared"):
        rundir.make_owned(tmp_path / "mine", "run")


def test_swap_in_replaces_only_what_llmkit_made(tmp_path):
    new = tmp_path / ".out.incoming"
    rundir.make_owned(new, "run")
    (new / "model.txt").write_text("new")
    user = tmp_path / "out"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(LlmkitError, match="is not an llmkit output"):
        rundir.swap_in(new, user)
    assert (user / "thesis.tex").read_text() == "years of work" and (new / "model.txt").read_text() == "new"
    (user / "thesis.tex").rename(tmp_path / "thesis.tex")
    user.rmdir()
    rundir.make_owned(user, "run")
    (user / "model.txt").write_text("old")
    rundir.swap_in(new, user)
    assert (user / "model.txt").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "thesis.tex"]


def test_write_text_is_whole_or_nothing(tmp_path):
    path = tmp_path / "recipe.toml"
    rundir.write_text(path, "old\n")
    with pytest.raises(TypeError):
        rundir.write_text(path, 123)  # fails while writing: the old file stays, no temporary is left
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]
    rundir.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]


def test_read_jsonl_tolerates_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo', encoding="utf-8")
    assert rundir.read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    rundir.truncate_metrics(path, after_step=1)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(LlmkitError, match=r"metrics.jsonl:2: not a JSON object"):
        rundir.read_jsonl(path)
    assert rundir.read_jsonl(tmp_path / "absent.jsonl") == []


def test_latest_is_a_link_replaced_whole_and_a_user_latest_stays(tmp_path):
    for name in ("a", "b"):
        rundir.make_owned(tmp_path / "runs" / name, "run")
    rundir.point_latest(tmp_path / "runs" / "a")
    rundir.point_latest(tmp_path / "runs" / "b")
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "b"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "b", "latest"]  # no temporary left
    latest.unlink()
    latest.write_text("a\n")  # llmkit's pointer file (where links are not available): replaced
    rundir.point_latest(tmp_path / "runs" / "b")
    assert latest.is_symlink() and os.readlink(latest) == "b"
    latest.unlink()
    latest.write_text("my list of the latest papers\n")
    rundir.point_latest(tmp_path / "runs" / "a")
    assert not latest.is_symlink() and latest.read_text() == "my list of the latest papers\n"
    latest.unlink()
    (latest / "sub").mkdir(parents=True)
    (latest / "sub" / "x.txt").write_text("x")
    rundir.point_latest(tmp_path / "runs" / "a")
    assert not latest.is_symlink() and (latest / "sub" / "x.txt").read_text() == "x"


def test_checkpoints_count_only_when_sealed_and_intact(tmp_path):
    run_dir = tmp_path / "run"
    for step in (2, 4, 6, 8):
        folder = run_dir / rundir.CHECKPOINTS / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
            (folder / name).write_bytes(b"x" * 100)
        if step != 8:  # checkpoint-8 was cut short before its seal
            rundir.seal_checkpoint(folder)
    (run_dir / rundir.CHECKPOINTS / "checkpoint-tmp").mkdir()
    checkpoint = run_dir / rundir.CHECKPOINTS
    (checkpoint / "checkpoint-6" / "model.safetensors").write_bytes(b"x" * 50)  # half of it
    (checkpoint / "checkpoint-4" / "optimizer.pt").unlink()
    assert rundir.last_checkpoint(run_dir) == checkpoint / "checkpoint-2"
    assert rundir.skipped_checkpoints(run_dir) == [checkpoint / f"checkpoint-{s}" for s in (8, 6, 4)]
    with pytest.raises(LlmkitError, match="no checkpoint to resume from"):
        rundir.check_run_dir(tmp_path / "absent", overwrite=False, resume=True)


def test_a_folder_is_locked_for_one_command_and_freed_when_its_process_dies(tmp_path, env):
    folder = tmp_path / "run"
    rundir.make_owned(folder, "run")
    descriptor = rundir.lock_folder(folder)
    with pytest.raises(LlmkitError, match="in use by another llmkit command"):
        rundir.lock_folder(folder)
    os.close(descriptor)
    os.close(rundir.lock_folder(folder))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from llmkit import rundir; rundir.lock_folder(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(600)", str(folder)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LlmkitError, match="in use"):
            rundir.lock_folder(folder)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    os.close(rundir.lock_folder(folder))  # the kernel released the lock of the killed process


def test_run_folder_discards_a_failed_replacement_and_keeps_the_old_run(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    rundir.make_owned(run_dir, "run")
    (run_dir / "model.safetensors").write_bytes(b"old weights")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="diverged"):
        with rundir.RunFolder(run_dir, overwrite=True, resume=False) as folder:
            folder.start("[run]\n", {"host": "test"})
            (folder.work_dir / "model.safetensors").write_bytes(b"half-trained")
            raise RuntimeError("diverged")
    assert snapshot(tmp_path) == before
    with rundir.RunFolder(run_dir, overwrite=True, resume=False) as folder:
        folder.start("[run]\n", {"host": "test"})
        (folder.work_dir / "model.safetensors").write_bytes(b"new weights")
    assert (run_dir / "model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny"]


# ---------------------------------------------------------------- refusals, end to end (nothing is written)


@pytest.mark.parametrize("name", ['""', ".", "..", "a/b", "../escape", ".hidden", "a\\b"])
def test_pretrain_refuses_a_run_name_that_is_not_one_plain_folder(tmp_path, env, name):
    before = plant(tmp_path)
    result = llmkit(tmp_path, env, *PRETRAIN, *sets([*TINY, f"run.name={name}"]))
    assert result.returncode == 2
    assert "run.name must be one plain folder name" in one_line(result)
    assert snapshot(tmp_path) == before  # nothing written, not even runs/


def overwrite_refusals(tmp_path: Path) -> dict:
    """case -> (cwd, arguments): each would replace a folder or file that a user made."""
    work = tmp_path / "work"
    (tmp_path / "elsewhere" / "mine").mkdir(parents=True)
    (tmp_path / "elsewhere" / "mine" / "results.csv").write_text("a,b\n1,2\n")
    (tmp_path / "runs").mkdir(exist_ok=True)
    (tmp_path / "runs" / "link").symlink_to("other", target_is_directory=True)  # a link to another run
    return {
        "user folder at output_dir=.": (tmp_path, [*PRETRAIN, *sets([*TINY, "run.output_dir=.", "run.name=docs"])]),
        "user folder, absolute output_dir": (tmp_path, [*PRETRAIN, *sets([
            *TINY, "run.name=mine", f"run.output_dir={tmp_path / 'elsewhere'}"])]),
        "the working folder itself": (work, [*PRETRAIN, *sets([*TINY, "run.output_dir=..", "run.name=work"])]),
        "a link to another run": (tmp_path, [*PRETRAIN, *sets([*TINY, "run.name=link"])]),
        "a file": (tmp_path, [*PRETRAIN, *sets([*TINY, "run.output_dir=.", "run.name=notes.txt"])]),
    }


@pytest.mark.parametrize("case", ["user folder at output_dir=.", "user folder, absolute output_dir",
                                  "the working folder itself", "a link to another run", "a file"])
def test_pretrain_overwrite_refuses_what_llmkit_did_not_make(tmp_path, env, reference, case):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "todo.txt").write_text("my own work\n")
    cwd, args = overwrite_refusals(tmp_path)[case]
    before = plant(tmp_path, reference)
    result = llmkit(cwd, env, *args, "--overwrite")
    assert result.returncode == 2
    line = one_line(result)
    assert "not an llmkit output" in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("output", [".", "docs", "runs/other-copy"])
def test_quantize_overwrite_refuses_an_output_llmkit_did_not_make(tmp_path, env, reference, output):
    """`llmkit quantize --model M --output X --overwrite`: X is the working folder, a folder of documents
    (no model in it), a copy of a run without its marker (a model, but not one llmkit may replace)."""
    work = tmp_path / "work"
    work.mkdir()
    plant(work, reference)
    shutil.copytree(reference, work / "runs" / "other-copy")
    (work / "runs" / "other-copy" / rundir.OWNER_MARK).unlink()  # a copy a user made and edited by hand
    before = snapshot(tmp_path)
    result = llmkit(work, env, "quantize", "--model", str(reference), "--method", "dynamic-int8", "--output", output,
                    "--overwrite")
    assert result.returncode == 2
    line = one_line(result)
    assert "not an llmkit output" in line, line
    assert snapshot(tmp_path) == before


def test_quantize_refuses_a_bad_run_name_before_writing(tmp_path, env, reference):
    before = plant(tmp_path)
    result = llmkit(tmp_path, env, "quantize", "--model", str(reference), "--method", "dynamic-int8",
                    "--set", "run.name=..", "--overwrite")
    assert result.returncode == 2 and "run.name must be one plain folder name" in one_line(result)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("output, message", [
    ("README.md", "must be a .json file"),  # an existing user file
    ("docs", "must be a .json file"),  # a folder
    ("package.json", "not an llmkit eval result"),  # a user's .json file
    ("results.json", "is a folder"),  # a folder named like a result file
])
def test_eval_output_refuses_a_file_or_folder_llmkit_eval_did_not_write(tmp_path, env, reference, output, message):
    (tmp_path / "results.json").mkdir()
    (tmp_path / "results.json" / "keep.txt").write_text("mine\n")
    before = plant(tmp_path, reference)
    result = llmkit(tmp_path, env, "eval", "eval-ppl", "--model", str(reference), "--limit", "2",
                    "--set", f"eval.output={output}")
    assert result.returncode == 2
    line = one_line(result)
    assert message in line and "eval.output" in line, line
    assert "results written" not in result.stdout  # refused before scoring
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- --overwrite: the old run stays until the new is done


@pytest.mark.parametrize("action, status, message", [
    ("SIGINT", 130, "as it was"),
    ("SIGTERM", 130, "as it was"),
    ("SIGKILL", -signal.SIGKILL, None),
    ("raise", 1, "failed: RuntimeError: loss is nan"),
])
def test_a_failed_or_interrupted_overwrite_leaves_the_old_run_whole(tmp_path, env, reference, action, status,
                                                                    message):
    plant(tmp_path, reference)
    run_dir = copy_run(reference, tmp_path / "runs" / "tiny")
    (tmp_path / "runs" / "latest").symlink_to("tiny", target_is_directory=True)
    before = snapshot(tmp_path)
    result = driven(tmp_path, env, {"at": "step_begin", "step": 1, "action": action},
                    *PRETRAIN, *sets([*REFERENCE, "run.name=tiny", "train.learning_rate=1e-3"]), "--overwrite")
    assert "hook: step_begin after step 1" in result.stdout, result.stderr[-3000:]
    assert result.returncode == status, result.stderr[-3000:]
    if message:
        line = one_line(result)
        assert message in line, line
    assert_survived(tmp_path, before)
    assert snapshot(run_dir) == {k.removeprefix("runs/tiny/"): v for k, v in before.items()
                                 if k.startswith("runs/tiny/")}
    if action == "SIGKILL":  # the replacement was being written beside the run, in runs/.tiny.incoming
        assert (tmp_path / "runs" / ".tiny.incoming" / rundir.CHECKPOINTS).is_dir()
    else:  # the unfinished replacement is cleared away
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "other", "tiny"]


def test_overwrite_continues_from_its_own_model_and_keeps_a_user_latest(tmp_path, env, reference):
    """model.path = the run's own folder with --overwrite; a replacement left by a crash is cleared; a
    folder named `latest` that the user made stays."""
    plant(tmp_path, reference)
    run_dir = copy_run(reference, tmp_path / "runs" / "tiny")
    leftover = tmp_path / "runs" / ".tiny.incoming"  # what a SIGKILLed --overwrite leaves
    rundir.make_owned(leftover, "run")
    (leftover / "half.bin").write_bytes(b"\0" * 10)
    (tmp_path / "runs" / "latest" / "papers").mkdir(parents=True)
    (tmp_path / "runs" / "latest" / "papers" / "list.txt").write_text("my reading list\n")
    before = snapshot(tmp_path)
    before = {k: v for k, v in before.items() if not k.startswith(("runs/tiny", "runs/.tiny"))}
    result = llmkit(tmp_path, env, *PRETRAIN, *sets([*FAST, "run.name=tiny", "model.path=runs/tiny",
                                                     "train.max_steps=1", "train.learning_rate=1e-9",
                                                     "train.warmup_steps=0"]), "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_survived(tmp_path, before)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "other", "tiny"]
    import torch

    old, new = weights(reference), weights(run_dir)
    assert old.keys() == new.keys()
    assert all(torch.allclose(old[k].float(), new[k].float(), atol=1e-6) for k in old)  # lr 1e-9: the same model
    assert (run_dir / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    assert [step for step, _ in losses(run_dir)] == [1] and (run_dir / rundir.OWNER_MARK).is_file()


# ---------------------------------------------------------------- one command at a time; SIGTERM; latest


def test_a_running_run_refuses_a_second_command_and_sigterm_leaves_it_resumable(tmp_path, env):
    """run.output_dir=. beside a file named `latest` that the user made: the file survives."""
    plant(tmp_path)
    (tmp_path / "latest").write_text("my latest ideas\n")
    before = snapshot(tmp_path)
    overrides = [*FAST, "run.output_dir=.", "run.name=long", "train.max_steps=5000", "train.save_every=2",
                 "train.eval_every=1000"]
    with (tmp_path / "first.out").open("w") as out, (tmp_path / "first.err").open("w") as err:
        first = subprocess.Popen([*LLMKIT, *PRETRAIN, *sets(overrides)], cwd=tmp_path, env=env, stdout=out, stderr=err)
    run_dir = tmp_path / "long"
    try:
        deadline = time.monotonic() + 180
        while not sealed_steps(run_dir):
            assert first.poll() is None, (tmp_path / "first.err").read_text()
            assert time.monotonic() < deadline, "no sealed checkpoint after 180 s"
            time.sleep(0.2)
        for option in ("--resume", "--overwrite"):
            second = llmkit(tmp_path, env, *PRETRAIN, *sets(overrides), option)
            assert second.returncode == 2, (option, second.stderr)
            assert "in use by another llmkit command" in one_line(second), option
        assert first.poll() is None, "the first run ended while the second command ran"
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    stdout, stderr = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert first.returncode == 130, stderr[-3000:]
    assert "--resume" in one_line(subprocess.CompletedProcess([], 130, stdout, stderr))
    newest = sealed_steps(run_dir)[-1]
    result = llmkit(tmp_path, env, *PRETRAIN, *sets([*overrides, f"train.max_steps={newest + 1}"]), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint-{newest}" in result.stderr and "train.max_steps" in result.stderr
    assert [step for step, _ in losses(run_dir)] == list(range(1, newest + 2))
    assert (run_dir / "model.safetensors").is_file()
    assert_survived(tmp_path, before)  # the file named `latest` included
    assert not any(p.is_symlink() for p in tmp_path.iterdir())


# ---------------------------------------------------------------- eval beside a run, a torn metrics line, resume checks


def test_an_evaluated_run_with_a_torn_metrics_line_resumes_and_its_recipe_is_checked(tmp_path, env, reference):
    """`llmkit eval` on a run writes evaluations.jsonl (never metrics.jsonl); a torn last line in
    metrics.jsonl is tolerated; --resume refuses a changed train.learning_rate (exit 2, naming it) unless
    --force, and accepts a changed train.max_steps (reported)."""
    before = plant(tmp_path, reference)
    run_dir = copy_run(reference, tmp_path / "runs" / "tiny")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    result = llmkit(tmp_path, env, "eval", "eval-ppl", "--model", "runs/tiny", "--limit", "3",
                    "--set", "eval.output=scores.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    evaluations = rundir.read_jsonl(run_dir / "evaluations.jsonl")
    assert len(evaluations) == 1 and "loss_per_char" in evaluations[0]
    from llmkit.evaluate import check_results_file

    check_results_file(tmp_path / "scores.json")  # a file llmkit eval wrote may be written again
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"step": 7, "loss": 3.1')  # a crash while a row was appended
    run_before = snapshot(run_dir)

    args = [*PRETRAIN, *sets([*REFERENCE, "run.name=tiny", "train.learning_rate=1e-3"]), "--resume"]
    result = llmkit(tmp_path, env, *args)
    assert result.returncode == 2
    line = one_line(result)
    assert "train.learning_rate" in line and "--force" in line, line
    assert snapshot(run_dir) == run_before

    result = llmkit(tmp_path, env, *args, "--force", "--set", "train.max_steps=7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming with changed" in result.stderr and "train.learning_rate" in result.stderr
    assert "train.max_steps" in result.stderr
    assert "resuming from runs/tiny/checkpoints/checkpoint-6" in result.stderr, result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6, 7]
    assert not any("eval_task" in row for row in rows)
    assert rundir.read_jsonl(run_dir / "evaluations.jsonl") == evaluations
    assert_survived(tmp_path, before)


# ---------------------------------------------------------------- damaged checkpoints


def test_resume_skips_damaged_checkpoints_and_equals_an_uninterrupted_run(tmp_path, env, reference):
    before = plant(tmp_path, reference)
    run_dir = copy_run(reference, tmp_path / "runs" / "tiny")
    checkpoints = run_dir / rundir.CHECKPOINTS
    (checkpoints / "checkpoint-4" / "optimizer.pt").unlink()
    (checkpoints / "checkpoint-5" / "trainer_state.json").unlink()
    model = checkpoints / "checkpoint-6" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    result = llmkit(tmp_path, env, *PRETRAIN, *sets([*REFERENCE, "run.name=tiny"]), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (4, 5, 6):
        assert f"skipping runs/tiny/checkpoints/checkpoint-{step}: incomplete" in result.stderr, result.stderr
    assert "resuming from runs/tiny/checkpoints/checkpoint-3" in result.stderr, result.stderr
    assert_same_weights(run_dir, reference)
    assert losses(run_dir) == losses(reference)
    assert sealed_steps(run_dir) == [3, 4, 5, 6]
    assert_survived(tmp_path, before)


# ---------------------------------------------------------------- the kill test


KILL_POINTS = {
    # name: (hook, the checkpoint --resume must start from, an incomplete checkpoint it must skip)
    "mid-step": ({"at": "pre_optimizer", "step": 5, "action": "SIGKILL"}, 4, None),
    "mid-checkpoint-write": ({"at": "torn", "step": 5, "action": "SIGKILL"}, 4, 5),
    "checkpoint-written-not-sealed": ({"at": "save", "step": 5, "action": "SIGKILL"}, 4, 5),
    "right-after-sealing": ({"at": "step_begin", "step": 4, "action": "SIGKILL"}, 4, None),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, env, reference, point):
    hook, start, skipped = KILL_POINTS[point]
    before = plant(tmp_path, reference)
    args = [*PRETRAIN, *sets([*REFERENCE, "run.name=tiny"])]
    killed = driven(tmp_path, env, hook, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "hook:" in killed.stdout
    run_dir = tmp_path / "runs" / "tiny"
    checkpoints = run_dir / rundir.CHECKPOINTS
    assert sealed_steps(run_dir)[-1] == start
    if point == "checkpoint-written-not-sealed":
        assert "sealed=False" in killed.stdout  # the driver's on_save ran before SealCheckpoints'
        assert (checkpoints / "checkpoint-5" / "optimizer.pt").is_file()
    if skipped:
        assert (checkpoints / f"checkpoint-{skipped}").is_dir()
        assert not (checkpoints / f"checkpoint-{skipped}" / rundir.SEAL).exists()
    result = llmkit(tmp_path, env, *args, "--resume")  # no lock left behind by the killed process
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from runs/tiny/checkpoints/checkpoint-{start}" in result.stderr, result.stderr
    if skipped:
        assert f"skipping runs/tiny/checkpoints/checkpoint-{skipped}: incomplete" in result.stderr, result.stderr
    assert_same_weights(run_dir, reference)
    assert losses(run_dir) == losses(reference)
    assert losses(run_dir, "eval_loss") == losses(reference, "eval_loss")
    assert sealed_steps(run_dir) == [3, 4, 5, 6]
    assert_survived(tmp_path, before)


# ---------------------------------------------------------------- quantize: an output made meanwhile is left alone


@pytest.mark.parametrize("overwrite", [False, True])
def test_quantize_leaves_an_output_someone_made_meanwhile(tmp_path, env, reference, overwrite):
    before = plant(tmp_path, reference)
    result = driven(tmp_path, env, {"at": "quantize_appears"}, "quantize", "--model", str(reference),
                    "--method", "dynamic-int8", "--output", "runs/small",
                    *sets(["quantize.limit=3", "quantize.speed_tokens=2", "quantize.speed_runs=1",
                           "quantize.task.context_length=32", "quantize.task.stride=16"]),
                    *(["--overwrite"] if overwrite else []))
    assert "hook: made runs/small" in result.stdout, result.stderr[-3000:]
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line(result)
    assert "runs/small" in line, line
    assert (tmp_path / "runs" / "small" / "mine.txt").read_text() == "made by someone else\n"
    assert sorted(p.name for p in (tmp_path / "runs" / "small").iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["other", "small"]  # no staging left
    assert_survived(tmp_path, before)


def test_provenance_names_the_machine_only_when_asked():
    import platform

    assert "host" not in rundir.provenance("f" * 64, 1)
    assert rundir.provenance("f" * 64, 1, record_host=True)["host"] == platform.node()
    assert {"versions", "git_commit", "command", "data_fingerprint", "world_size"} <= set(rundir.provenance("f", 2))

