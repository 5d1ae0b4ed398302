"""TrainingArguments from a recipe (llmkit.training); the Trainer, run folders and resuming are exercised
end to end by tests/test_pretrain.py, tests/test_finetune.py and tests/test_rundir.py."""

import pytest

from llmkit.devices import training_precision
from llmkit.recipe import load_recipe
from llmkit.training import training_arguments


# training_arguments


def arguments(tmp_path, *overrides):
    settings = load_recipe(None, list(overrides))
    return training_arguments(settings.train, settings.distributed, 7, tmp_path)


def test_training_arguments_map_the_settings(tmp_path):
    args = arguments(tmp_path, "train.max_steps=50", "train.batch_size=4", "train.gradient_accumulation=2",
                     "train.learning_rate=3e-4", "train.eval_every=10", "train.keep_checkpoints=3")
    assert (args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (50, 4, 2)
    assert args.learning_rate == 3e-4 and args.eval_steps == 10 and args.save_total_limit == 3
    assert args.seed == 7 and args.data_seed == 7 and args.output_dir == str(tmp_path)
    assert args.report_to in ([], "none", ["none"])


def test_scheduler_is_cosine_down_to_min_lr_rate(tmp_path):
    args = arguments(tmp_path, "train.min_lr_ratio=0.2")
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.2}


@pytest.mark.parametrize("warmup, expected", [("0.05", 0.05), ("10.0", 10), ("10", 10)])
def test_warmup_below_one_is_a_ratio_else_steps(warmup, expected, tmp_path):
    steps = arguments(tmp_path, f"train.warmup_steps={warmup}").warmup_steps
    assert steps == expected and type(steps) is type(expected)


def test_ddp_passes_no_fsdp_nor_deepspeed(tmp_path):
    args = arguments(tmp_path)
    assert not args.fsdp and not args.fsdp_config and not args.deepspeed
    assert args.bf16 is (training_precision("auto").name == "bf16") and args.fp16 is False


def test_fsdp_strategy_passes_fsdp_options(tmp_path):
    args = arguments(tmp_path, "distributed.strategy=fsdp",
                     'distributed.fsdp_config={transformer_layer_cls_to_wrap = ["LlamaDecoderLayer"]}')
    assert args.fsdp
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]


def test_a_missing_deepspeed_config_is_refused_naming_the_shipped_one(tmp_path):
    from llmkit.errors import LlmkitError

    with pytest.raises(LlmkitError, match=r"^distributed.deepspeed: no such file: .*ds_zero2.json .*recipes/deepspeed/zero2.json"):
        arguments(tmp_path, "distributed.strategy=deepspeed", f"distributed.deepspeed={tmp_path / 'ds_zero2.json'}")


def test_gradient_checkpointing_is_passed_on(tmp_path):
    assert arguments(tmp_path, "train.gradient_checkpointing=true").gradient_checkpointing is True


def test_report_to_an_unknown_or_missing_integration_is_refused_before_anything_is_written(tmp_path):
    from llmkit.errors import LlmkitError

    with pytest.raises(LlmkitError, match=r"^train.report_to: unknown integration 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        arguments(tmp_path, 'train.report_to=["tensorbord"]')
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_receives_the_losses_of_metrics_jsonl(tiny, tmp_path):
    """train.report_to = ["tensorboard"]: the event file in <run>/tensorboard, read back with tensorboard's own
    reader, holds the training losses that metrics.jsonl holds, step for step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llmkit import pretrain
    from llmkit.rundir import read_jsonl

    result = pretrain.run(load_recipe("pretrain-zh-tiny", [*tiny, 'train.report_to=["tensorboard"]']))
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    expected = [(row["step"], row["loss"]) for row in read_jsonl(result.run_dir / "metrics.jsonl") if "loss" in row]
    assert len(logged) == len(expected) == 6
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_mixed_precision_logits_stay_in_bf16_and_the_loss_is_unchanged():
    """accelerate's fp32 copy of a bf16 forward's outputs is undone; autocast and the fp32 loss stay."""
    import torch
    import transformers
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from llmkit.training import keep_outputs_in_autocast_dtype
    from tests.conftest import char_tokenizer

    tokenizer = char_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer before chose its own precision
    try:
        model = Accelerator(cpu=True, mixed_precision="bf16").prepare(transformers.LlamaForCausalLM(config))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # and so will the Trainers after
    ids = torch.randint(0, len(tokenizer), (2, 16))
    before = model(input_ids=ids, labels=ids)
    keep_outputs_in_autocast_dtype(model)
    after = model(input_ids=ids, labels=ids)
    assert before.logits.dtype == torch.float32 and after.logits.dtype == torch.bfloat16
    assert after.loss.dtype == torch.float32 and after.loss.item() == pytest.approx(before.loss.item())
    keep_outputs_in_autocast_dtype(model)  # a second call (every training step) changes nothing
    assert model(input_ids=ids, labels=ids).logits.dtype == torch.bfloat16
