"""Several processes on the CPU (gloo), launched for real: torchrun with each distributed.strategy, `accelerate
launch` with each shipped config of recipes/accelerate/, two torchrun agents as two machines. Each run trains
the tiny recipe on 2 processes x 8 blocks and must end where one process on 16 blocks ends (the same data in the
same order, gradients averaged: measured within 1e-7; a run whose processes did not share gradients ends 9e-3
away). DeepSpeed ZeRO-3 builds the model already partitioned and draws its random initial weights otherwise
than a whole model does, so its runs start from the single run's saved model, and must end where one process
continuing from it ends. Covers llmkit/distributed.py (the tokenizer trained once and shared, FSDP on CPUs,
DeepSpeed's process group on CPUs, sharded models)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, problems

pytestmark = pytest.mark.slow
RECIPES = Path(__file__).parent.parent / "recipes"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(launcher: list[str], runs: Path, name: str, *overrides: str, module: str = "llmkit") -> list[str]:
    settings = [*TINY, f"run.output_dir={runs}", f"run.name={name}", *overrides]
    return [*launcher, "-m", module, "pretrain", "pretrain-zh-tiny", *(a for o in settings for a in ("--set", o))]


def environment(runs: Path, **more: str) -> dict:
    # One thread a process, no GPU (gloo), the suite's cache: the same wherever the suite runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
            "LLMKIT_CACHE": str(runs.parent / "llmkit-cache"), **more}


def pretrain(launcher: list[str], runs: Path, name: str, *overrides: str, module: str = "llmkit", **env: str):
    result = subprocess.run(command(launcher, runs, name, *overrides, module=module), capture_output=True,
                            text=True, timeout=300, env=environment(runs, **env))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def torchrun(processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model.safetensors")


def assert_same_weights(run_dir: Path, reference_dir: Path, tolerance: float = TOLERANCE) -> None:
    ours, reference = weights(run_dir), weights(reference_dir)
    assert ours.keys() == reference.keys()  # tied weights saved once, gathered from shards or not
    far = {k: (ours[k] - reference[k]).abs().max().item() for k in ours
           if not torch.allclose(ours[k], reference[k], rtol=0, atol=tolerance)}
    assert not far, f"weights differ from {reference_dir.name} by more than {tolerance}: {far}"


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    """One process on the global batch of two processes x 8 blocks."""
    pretrain([sys.executable], runs, "single", "train.batch_size=16")
    return runs / "single"


@pytest.fixture(scope="module")
def continued(runs, reference) -> Path:
    """One process on 16 blocks again, continuing from the reference's model: where the ZeRO-3 runs start."""
    pretrain([sys.executable], runs, "continued", "train.batch_size=16", f"model.path={reference}")
    return runs / "continued"


@pytest.fixture(scope="module")
def ddp(runs, reference) -> tuple[Path, list[str]]:
    """torchrun, 2 processes, plain data parallelism; each process writes down which tokenizer it used."""
    spy = runs / "ddp-spy.txt"
    result = pretrain(torchrun(), runs, "ddp", module="tests.rank_spy", RANK_SPY=str(spy))
    assert problems(result.stderr) == [], result.stderr
    return runs / "ddp", spy.read_text().splitlines()


def test_torchrun_ddp_trains_what_one_process_does_on_the_same_global_batch(ddp, reference):
    run_dir, _ = ddp
    assert json.loads((run_dir / "provenance.json").read_text())["world_size"] == 2
    assert_same_weights(run_dir, reference)
    first, last = weights(reference / "checkpoints" / "checkpoint-3"), weights(reference)
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained


def test_the_tokenizer_is_trained_on_rank_0_only_and_every_rank_uses_it(ddp, reference):
    run_dir, spy = ddp
    assert sorted(line for line in spy if "trained" in line) == ["0 trained a tokenizer"]
    used = {line.split()[0]: line.split()[-1] for line in spy if "model built" in line}
    assert used.keys() == {"0", "1"} and len(set(used.values())) == 1
    saved = json.loads((run_dir / "tokenizer.json").read_text())
    assert saved == json.loads((reference / "tokenizer.json").read_text())


def test_torchrun_fsdp_shards_and_ends_with_the_weights_of_one_process(runs, reference):
    result = pretrain(torchrun(), runs, "fsdp", "distributed.strategy=fsdp")
    assert problems(result.stderr) == [], result.stderr
    run_dir = runs / "fsdp"
    # FSDP's own checkpoint files: the run was sharded, not DDP under another name
    assert (run_dir / "checkpoints" / "checkpoint-3" / "pytorch_model_fsdp.bin").is_file()
    assert_same_weights(run_dir, reference)
    assert "昨天天气很" in result.stdout  # samples generated from the gathered model at the end


def test_torchrun_deepspeed_zero2_ends_with_the_weights_of_one_process(runs, reference):
    result = pretrain(torchrun(), runs, "zero2", "distributed.strategy=deepspeed",
                      f"distributed.deepspeed={RECIPES / 'deepspeed' / 'zero2.json'}")
    assert problems(result.stderr) == [], result.stderr
    # DeepSpeed prints on stdout, on CPUs, that it built its shared-memory op: beside llmkit's results
    assert result.stdout.startswith(("done: model saved in", "DeepSpeed deepspeed.ops.comm"))
    run_dir = runs / "zero2"
    assert (run_dir / "checkpoints" / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's checkpoint
    assert_same_weights(run_dir, reference)


def test_torchrun_deepspeed_zero3_partitions_and_ends_with_the_weights_of_one_process(runs, reference, continued):
    result = pretrain(torchrun(), runs, "zero3", "distributed.strategy=deepspeed",
                      f"distributed.deepspeed={RECIPES / 'deepspeed' / 'zero3.json'}", f"model.path={reference}")
    assert problems(result.stderr) == [], result.stderr
    assert "model: llama, 0.06M parameters" in result.stderr  # counted whole, though each process holds a slice
    run_dir = runs / "zero3"
    assert_partitioned(run_dir / "checkpoints" / "checkpoint-3")
    assert_same_weights(run_dir, continued)
    assert_loads_whole(run_dir, continued)
    assert "昨天天气很" in result.stdout  # samples generated at the end from the saved model, read back whole


def assert_partitioned(checkpoint: Path) -> None:
    """DeepSpeed's ZeRO-3 checkpoint: the model's states saved by each process, each holding no tensor of the
    module whole (its parameters are the slices in that process's optimizer states)."""
    states = sorted((checkpoint / "global_step3").glob("*model_states.pt"))
    assert [path.name for path in states] == [f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)]
    module = torch.load(states[0], weights_only=False)["module"]
    assert module and all(tensor.numel() == 0 for tensor in module.values())


def assert_loads_whole(run_dir: Path, reference_dir: Path) -> None:
    """The saved model, read with plain transformers, has every weight full size and trained as the reference."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(run_dir).state_dict()
    reference = weights(reference_dir)
    assert {k: tuple(loaded[k].shape) for k in reference} == {k: tuple(v.shape) for k, v in reference.items()}
    assert all(torch.allclose(loaded[k], v, rtol=0, atol=TOLERANCE) for k, v in reference.items())


@pytest.mark.parametrize("config", sorted(path.stem for path in (RECIPES / "accelerate").glob("*.yaml")))
def test_accelerate_launch_with_each_shipped_config(request, runs, reference, config):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(RECIPES / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
                "--main_process_port", str(free_port())]
    zero3 = config == "deepspeed-zero3"
    pretrain(launcher, runs, f"accelerate-{config}", *([f"model.path={reference}"] if zero3 else []))
    run_dir = runs / f"accelerate-{config}"
    assert json.loads((run_dir / "provenance.json").read_text())["world_size"] == 2
    checkpoint = run_dir / "checkpoints" / "checkpoint-3"
    assert {"ddp": "optimizer.pt", "fsdp": "pytorch_model_fsdp.bin", "deepspeed-zero2": "global_step3",
            "deepspeed-zero3": "global_step3"}[config] in {path.name for path in checkpoint.iterdir()}
    if zero3:
        assert_partitioned(checkpoint)
    assert_same_weights(run_dir, request.getfixturevalue("continued") if zero3 else reference)


def test_two_machines_end_where_one_machine_with_two_processes_does(runs, ddp):
    """Two torchrun agents on 127.0.0.1, one process each, meeting through c10d rendezvous: two machines."""
    port = free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "llmkit-test"]
    machines = [subprocess.Popen(command(agent, runs, "two-machines"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=environment(runs)) for _ in range(2)]
    outputs = [machine.communicate(timeout=300) for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], [err[-3000:] for _, err in outputs]
    run_dir = runs / "two-machines"
    assert json.loads((run_dir / "provenance.json").read_text())["world_size"] == 2
    assert_same_weights(run_dir, ddp[0], tolerance=1e-7)


def train_on_rank_0_only(rank: int, port: int, results, fail: bool) -> None:
    """One of two processes calling once_for_all (torch.multiprocessing.spawn runs it)."""
    import torch.distributed as dist

    from llmkit.distributed import leave, once_for_all
    from llmkit.errors import LlmkitError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def make():
        if fail:
            raise LlmkitError("tokenizer.vocab_size = 3 is too small")
        return {"made by": rank}

    try:
        results[rank] = once_for_all(make)
    except LlmkitError as error:
        results[rank] = f"error: {error}"
    leave()  # as every command ends: together, the process group ended
    results[f"{rank} left"] = not dist.is_initialized()


@pytest.mark.parametrize("fail", [False, True])
def test_once_for_all_makes_on_rank_0_and_every_rank_gets_its_result_or_its_error(fail):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(train_on_rank_0_only, args=(free_port(), results, fail), nprocs=2)
        got = dict(results)
    expected = "error: tokenizer.vocab_size = 3 is too small" if fail else {"made by": 0}
    assert got == {0: expected, 1: expected, "0 left": True, "1 left": True}


def test_once_for_all_without_a_process_group_just_makes():
    from llmkit.distributed import once_for_all

    assert once_for_all(lambda: 42) == 42


def test_a_streamed_corpus_under_torchrun_trains_what_one_process_does(runs):
    """data.streaming: rank 0 reads the stream and hands each process its share of every global batch
    (accelerate's dispatching), so 2 processes x 8 blocks end where one process on 16 blocks does."""
    streamed = ["data.streaming=true", "data.validation_documents=50"]
    pretrain([sys.executable], runs, "streamed-single", *streamed, "train.batch_size=16")
    result = pretrain(torchrun(), runs, "streamed-ddp", *streamed)
    assert problems(result.stderr) == [], result.stderr
    assert "streamed training" in result.stderr
    assert_same_weights(runs / "streamed-ddp", runs / "streamed-single")
    first, last = weights(runs / "streamed-single" / "checkpoints" / "checkpoint-3"), weights(runs / "streamed-single")
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained


def test_full_size_counts_a_parameter_whole_where_zero3_left_a_slice():
    from llmkit.distributed import full_size

    sliced = torch.nn.Parameter(torch.empty(0))
    sliced.ds_numel = 12  # as DeepSpeed ZeRO-3 marks what it partitioned
    assert full_size(sliced) == 12 and full_size(torch.nn.Parameter(torch.ones(3, 4))) == 12
