"""llmkit plan: its counts against the model it builds and against the architecture's formula, memory by part
(AdamW's 8 bytes per trainable parameter, LoRA, sharding over processes), the timed estimate, every shipped
recipe, bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from llmkit import budget, load_recipe, plan
from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.recipe import shipped_recipe_names
from tests.conftest import TINY, char_tokenizer, save_tiny_model

runner = CliRunner()
SMALL = [s for s in TINY if not s.startswith(("data.max_documents", "train.max_steps"))] + ["train.max_minutes=0"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A saved tiny Llama with its tokenizer: the base of fine-tuning plans."""
    return save_tiny_model(tmp_path_factory.mktemp("base") / "model", "LlamaForCausalLM", char_tokenizer())


@pytest.fixture
def reviews(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": text, "label": label} for text, label in
            [("质量很好", "positive"), ("物流太慢", "negative"), ("非常满意", "positive"), ("很失望", "negative")] * 10]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def pretrain_plan(*sets, processes=None, steps=0):
    return plan.run(load_recipe("pretrain-zh-tiny", [*SMALL, *sets]), "pretrain", processes, steps)


def test_parameters_are_the_built_models_and_the_formula():
    recipe = load_recipe("pretrain-zh-tiny", SMALL)
    model = plan.pretrain_model(recipe)[0]
    parts = pretrain_plan()["parameters"]
    assert parts["all"]["total"] == sum(p.numel() for p in model.parameters()) == parts["all"]["trainable"]
    assert sum(parts[name]["total"] for name in ("embeddings", "layers", "head")) == parts["all"]["total"]
    # Llama, tied embeddings: vocabulary x d; per layer q, k, v, o (d x d), SwiGLU (3 x d x d_ff), 2 norms; final norm
    d, d_ff, layers, vocabulary = 32, 64, 1, 2000
    assert parts["embeddings"]["total"] == vocabulary * d
    assert parts["layers"]["total"] == layers * (4 * d * d + 3 * d * d_ff + 2 * d)
    assert parts["head"]["total"] == d


def test_memory_of_full_training_in_fp32():
    result = pretrain_plan()
    parameters, memory = result["parameters"]["all"]["total"], result["memory_per_device"]
    assert memory["weights"] == memory["gradients"] == 4 * parameters
    assert memory["optimizer"] == 8 * parameters
    assert 0 < memory["activations"] < memory["total"]
    assert memory["total"] == sum(value for key, value in memory.items() if key != "total")
    bigger = pretrain_plan("train.batch_size=16")["memory_per_device"]["activations"]
    assert bigger == pytest.approx(2 * memory["activations"], rel=0.01)  # activations grow with the batch
    deep = pretrain_plan("model.n_layer=4")["memory_per_device"]["activations"]
    checkpointed = pretrain_plan("model.n_layer=4", "train.gradient_checkpointing=true")["memory_per_device"]
    assert checkpointed["activations"] < deep  # each layer keeps its input only


def test_tokens_per_step_and_in_all():
    result = pretrain_plan("train.max_steps=50", "train.gradient_accumulation=3", processes=2)
    assert result["tokens"] == {"per_step": 32 * 8 * 3 * 2, "steps": 50, "in_all": 32 * 8 * 3 * 2 * 50,
                                "sequences_per_step": 48, "tokens_per_sequence": 32, "micro_batch": 8}


def test_lora_trains_and_stores_less_than_full(tmp_path, base_model, reviews):
    def finetune_plan(method):
        recipe = load_recipe("classify", [f"model.path={base_model}", f"finetune.source={reviews}",
                                          "finetune.test_source=", f"finetune.method={method}", "train.precision=fp32",
                                          "train.epochs=2", "train.batch_size=8", "finetune.max_length=16"])
        return plan.run(recipe, "finetune", measure_steps=0)

    full, lora = finetune_plan("full"), finetune_plan("lora")
    assert lora["parameters"]["all"]["trainable"] < full["parameters"]["all"]["trainable"]
    assert lora["parameters"]["all"]["total"] > full["parameters"]["all"]["total"]  # the adapter comes on top
    for result in (full, lora):
        trainable, memory = result["parameters"]["all"]["trainable"], result["memory_per_device"]
        assert memory["optimizer"] == 8 * trainable
        assert memory["gradients"] == 4 * trainable
    assert lora["memory_per_device"]["optimizer"] < full["memory_per_device"]["optimizer"]
    # 36 of the 40 reviews train (10% held out), 8 a step: 5 steps an epoch, 2 epochs
    assert full["tokens"]["steps"] == 10


def test_sharding_divides_by_the_processes(tmp_path):
    ddp = pretrain_plan(processes=4)["memory_per_device"]
    fsdp = pretrain_plan("distributed.strategy=fsdp", processes=4)["memory_per_device"]
    grad_op = pretrain_plan("distributed.strategy=fsdp", "distributed.fsdp=shard_grad_op", processes=4)
    assert ddp["weights"] == pretrain_plan()["memory_per_device"]["weights"]  # DDP: a whole copy everywhere
    for part in ("weights", "gradients", "optimizer"):
        assert fsdp[part] == -(-ddp[part] // 4)
    assert grad_op["memory_per_device"]["weights"] == ddp["weights"]
    assert grad_op["memory_per_device"]["optimizer"] == -(-ddp["optimizer"] // 4)
    for stage, divided in ((1, {"optimizer"}), (2, {"gradients", "optimizer"}), (3, {"weights", "gradients", "optimizer"})):
        config = tmp_path / f"zero{stage}.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": stage}}), encoding="utf-8")
        zero = pretrain_plan("distributed.strategy=deepspeed", f"distributed.deepspeed={config}", processes=4)
        assert set(zero["sharded"]) == divided
        for part in ("weights", "gradients", "optimizer"):
            assert zero["memory_per_device"][part] == (-(-ddp[part] // 4) if part in divided else ddp[part])


def test_world_size_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert pretrain_plan()["processes"] == 3
    assert pretrain_plan(processes=2)["processes"] == 2
    monkeypatch.setenv("WORLD_SIZE", "many")
    with pytest.raises(LlmkitError, match="WORLD_SIZE must be a whole number of processes, at least 1, got 'many'"):
        pretrain_plan()


def test_the_time_estimate_is_measured_and_scales_with_steps(one_thread):
    short, long = (pretrain_plan(f"train.max_steps={steps}", steps=3)["time"] for steps in (100, 1000))
    for timing, steps in ((short, 100), (long, 1000)):
        assert timing["seconds_per_step"] > 0
        assert timing["estimated_seconds"] == pytest.approx(timing["seconds_per_step"] * steps, abs=0.1)
    assert 3 < long["estimated_seconds"] / short["estimated_seconds"] < 30  # 10x the steps; timing noise aside
    if torch.cuda.is_available():  # the peak holds at least the weights, gradients and optimizer state
        planned = pretrain_plan(steps=1)
        held = sum(planned["memory_per_device"][part] for part in ("weights", "gradients", "optimizer"))
        assert planned["time"]["measured_peak_bytes"] >= held
    else:  # CPUs report no peak: none is made up
        assert short["measured_peak_bytes"] is None


def test_a_time_budget_plans_the_steps_that_fit(one_thread):
    planned = pretrain_plan("train.max_minutes=0.5", "train.max_steps=100000", steps=3)
    seconds = planned["time"]["seconds_per_step"]
    assert planned["tokens"]["steps"] == pytest.approx(budget.steps_within(0.5, seconds, 100000), rel=0.01)  # rounded
    assert planned["time"]["estimated_seconds"] == pytest.approx(30, rel=0.05)  # the budget, in steps of that time


def test_a_deepspeed_config_that_cannot_be_read(tmp_path):
    with pytest.raises(LlmkitError, match="distributed.deepspeed .*cannot read"):
        pretrain_plan("distributed.strategy=deepspeed", f"distributed.deepspeed={tmp_path / 'none.json'}", processes=2)


@pytest.mark.slow  # a step of every training recipe, their data read: about a minute
def test_every_shipped_recipe_plans_or_says_why_not(tmp_path, base_model, one_thread):
    """Cheap settings for every recipe; the ones that do not train are refused in one line."""
    shrink = ["data.block_size=16", "finetune.max_length=16", "train.batch_size=2", "train.gradient_accumulation=1",
              "train.precision=fp32", "model.n_layer=1", "model.n_head=2", "model.n_kv_head=0", "model.d_model=32",
              "model.d_ff=64", "model.max_positions=64", "tokenizer.vocab_size=300", f"run.output_dir={tmp_path}"]
    refused = {"eval-ppl": "eval", "prompt-sentiment": "eval", "prompt-entity": "eval", "quantize-nf4": "quantize",
               "quantize-int8": "quantize", "quantize-classify": "quantize", "prune": "quantize",
               "ngram-zh": "ngram", "multitask": "finetune.tasks", "eval-caption": "eval"}
    for name in shipped_recipe_names():
        recipe = load_recipe(name)
        # what a recipe loads from an earlier run (the quickstart model, the classifier) is the tiny base here
        loads = [f"{key}={base_model}" for key in ("model.path", "tokenizer.path")
                 if getattr(getattr(recipe, key.split(".")[0]), "path")]
        result = runner.invoke(app, ["plan", name, "--steps", "1", "--json",
                                     *(arg for s in shrink + loads for arg in ("--set", s))])
        if name in refused:
            assert result.exit_code == 2, (name, result.output)
            assert refused[name] in result.output and len(result.output.strip().splitlines()) == 1, result.output
        else:
            assert result.exit_code == 0, (name, result.output)
            planned = json.loads(result.stdout)
            assert planned["time"]["seconds_per_step"] > 0 and planned["parameters"]["all"]["total"] > 0, name


def test_cli_table_and_json(one_thread):
    sets = [arg for s in SMALL for arg in ("--set", s)]
    table = runner.invoke(app, ["plan", "pretrain-zh-tiny", "--steps", "1", *sets])
    assert table.exit_code == 0, table.output
    for row in ("parameters", "memory: optimizer", "memory: activations", "an estimate", "tokens per step",
                "estimated wall time"):
        assert row in table.output
    quiet = runner.invoke(app, ["plan", "pretrain-zh-tiny", "--steps", "0", "--json", "--nproc", "2", *sets])
    planned = json.loads(quiet.stdout)
    assert planned["processes"] == 2 and "time" not in planned


@pytest.mark.parametrize("arguments, message", [
    (["plan", "no-such-recipe"], "recipe not found: no-such-recipe"),
    (["plan", "pretrain-zh-tiny", "--set", "train.batch_size=0"], "train.batch_size must be"),
    (["plan", "pretrain-zh-tiny", "--steps", "-1"], "--steps must be 0 or more"),
    (["plan", "pretrain-zh-tiny", "--nproc", "0"], "--nproc must be a whole number of processes, at least 1, got 0"),
])
def test_bad_input_is_one_line_and_exit_2(arguments, message):
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
