"""What reaches the terminal (llmkit.console): the libraries' notices that are not the user's business stay
off stderr, on every CPU alike."""

import subprocess
import sys

from tests.conftest import problems

NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
          "sure you already `pip install kernels` and the kernels >= 0.11.1")


def stderr_of(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr


def test_the_optional_kernel_notice_of_bitsandbytes_is_dropped_and_its_other_warnings_kept():
    # What bitsandbytes logs when imported on a CPU with avx512_bf16 (mocked: logged here on any CPU).
    emit = ("import logging; logger = logging.getLogger('bitsandbytes.backends.cpu.ops'); "
            f"logger.warning({NOTICE!r}); logger.warning('another bitsandbytes warning')")
    assert NOTICE in stderr_of(emit)  # without llmkit, Python prints it
    shown = stderr_of("import llmkit; " + emit)
    assert NOTICE not in shown and "another bitsandbytes warning" in shown


def test_deepspeeds_notice_that_it_runs_on_the_cpu_is_dropped():
    # DeepSpeed logs it on stdout whenever it is imported on a machine without GPUs (hidden here).
    import os

    code = "from deepspeed.accelerator import get_accelerator; print(get_accelerator().device_name())"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}

    def stdout_of(program: str) -> str:
        return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                              env=env).stdout

    assert "Setting accelerator to CPU" in stdout_of(code)
    assert stdout_of("import llmkit; " + code) == "cpu\n"


def test_recipe_check_prints_nothing_on_stderr_and_a_pretrain_only_its_progress(tmp_path, tiny):
    """Results on stdout; on stderr llmkit's own progress lines and nothing from the libraries under it."""
    import os

    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    check = subprocess.run([sys.executable, "-m", "llmkit", "recipe", "check", "pretrain-zh-tiny"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert check.returncode == 0 and check.stderr == ""
    sets = [arg for item in tiny + ["train.max_steps=2", "train.eval_every=2"] for arg in ("--set", item)]
    run = subprocess.run([sys.executable, "-m", "llmkit", "pretrain", "pretrain-zh-tiny", *sets],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr and problems(run.stderr) == [], run.stderr
    assert run.stdout.startswith("done: model saved in") and "step " not in run.stdout
