"""What a run launched on several processes needs beyond what Trainer and accelerate do: work done once
on the main process and shared with the others, FSDP and DeepSpeed ZeRO-3 on CPUs, whether the model's
parameters are sharded across the processes, and a whole copy of a model that ZeRO-3 built partitioned.

Launch with `torchrun` or `accelerate launch` (configs in recipes/accelerate/); the processes find each
other through the launcher, and `training.training_arguments` starts the process group.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

from llmkit.errors import LlmkitError

T = TypeVar("T")


def once_for_all(make: Callable[[], T]) -> T:
    """make() run on the main process only, its result sent to every other process (pickled, over the
    process group: no disk needs to be shared between machines). An LlmkitError raised there is raised on
    every process, so that none waits for a result that will not come. Without a process group make() runs
    here."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (make(), None)
        except LlmkitError as error:
            box[0] = (None, str(error))
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise LlmkitError(error)
    return result


def shard_on_cpu(trainer) -> None:
    """FSDP on CPUs. accelerate applies an FSDP plugin only on accelerators (AcceleratorState leaves a CPU run
    MULTI_CPU, that is DDP, whatever it was given), while torch's FSDP2 (`fully_shard`) also runs on CPUs over
    gloo. So on a CPU run that asks for FSDP (distributed.strategy = "fsdp", or `accelerate launch` with an
    FSDP config) the state is marked FSDP here, right after the Trainer made its Accelerator and before it
    prepares the model: accelerate then shards, gathers and saves as it does on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if trainer.args.fsdp_plugin_args is not None:
        plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate launch --config_file fsdp.yaml
        plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables the launcher set
    else:
        return
    # Every AcceleratorState() copies distributed_type from PartialState's shared state: both are set.
    PartialState._shared_state["distributed_type"] = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def is_sharded(trainer) -> bool:
    """Whether no single process holds the whole model (FSDP, DeepSpeed ZeRO-3): it can then neither
    generate alone nor be used as it is after training (read the saved folder instead)."""
    if trainer.is_fsdp_enabled:
        return True
    return trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3


def join_deepspeed_on_cpu(args) -> None:
    """On CPUs, DeepSpeed joins the process group as soon as there is one. On accelerators TrainingArguments
    has DeepSpeed start the group; on CPUs (use_cpu) accelerate starts a plain gloo one, which DeepSpeed
    joins only in deepspeed.initialize, when the Trainer prepares the model. ZeRO-3 needs it earlier, as the
    model is built: transformers builds it under deepspeed.zero.Init, which reads its config before joining,
    counts one process and refuses the batch size (train_batch_size) that TrainingArguments made for all."""
    import torch.distributed

    if not args.deepspeed or not torch.distributed.is_initialized():
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=torch.distributed.get_backend())


def leave() -> None:
    """This process's part in a launch is done: it waits for the others, then ends the process group. Left to
    the interpreter's exit, gloo's threads can abort a process ("terminate called without an active
    exception", exit -6) after its work is saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def full_size(parameter) -> int:
    """A parameter's element count, whole even where DeepSpeed ZeRO-3 left this process a slice of it."""
    return getattr(parameter, "ds_numel", parameter.numel())


def whole_copy(model):
    """A copy of `model` that this process can run alone, such as the time budget's probe (which, as under
    FSDP, holds the whole model): when DeepSpeed ZeRO-3 partitioned its parameters as it was built (each
    process holds a slice, the module an empty tensor), they are gathered for the copy, on every process at
    once (each must call this)."""
    import copy

    partitioned = [parameter for parameter in model.parameters() if hasattr(parameter, "ds_id")]
    if not partitioned:
        return copy.deepcopy(model)
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        return copy.deepcopy(model)
