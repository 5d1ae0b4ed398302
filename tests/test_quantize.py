"""llmkit quantize on a tiny random Llama: every method saves a model that reloads in a new process and
generates; the report is measured from the saved files; the source is never touched."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmkit import load_recipe
from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.quantize import REPORT_FILE, run
from tests.conftest import char_tokenizer, save_tiny_model

runner = CliRunner()
TEXTS = ["今天天气很好", "我们热爱和平", "经济发展迅速", "人民生活改善"]
METHODS = {  # output name -> overrides
    "bnb-int8": ["quantize.method=bnb-int8"],
    "bnb-nf4": ["quantize.method=bnb-nf4", "quantize.dtype=bfloat16"],
    "bnb-fp4": ["quantize.method=bnb-fp4", "quantize.double_quant=false"],
    "dynamic-int8": ["quantize.method=dynamic-int8"],
    "prune": ["quantize.method=prune", "quantize.sparsity=0.5"],
    "mlp-units": ["quantize.method=prune", "quantize.structure=mlp-units", "quantize.sparsity=0.25"],
    "attention-heads": ["quantize.method=prune", "quantize.structure=attention-heads"],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    save_tiny_model(root / "source", "LlamaForCausalLM", char_tokenizer())
    (root / "text.txt").write_text("\n".join(TEXTS * 2), encoding="utf-8")
    return root


def quick(root: Path, output: str, *overrides: str) -> list[str]:
    """Overrides for a seconds-long run on the tiny source, scored on a small text file."""
    return [f"quantize.model={root / 'source'}", f"quantize.output={root / output}",
            f"quantize.task.source={root / 'text.txt'}", "quantize.task.context_length=16",
            "quantize.task.stride=8", "quantize.speed_tokens=2", "quantize.speed_runs=1",
            "generate.prompts=['今天']", *overrides]


@pytest.fixture(scope="module")
def compressed(workdir):
    """compressed(name): the report of METHODS[name] run on the tiny source (once, on first use)."""
    reports = {}

    def get(name: str) -> dict:
        if name not in reports:
            reports[name] = run(load_recipe(None, quick(workdir, name, *METHODS[name])))
        return reports[name]

    return get


@pytest.fixture(scope="module")
def outputs(compressed):
    """Every method run once on the tiny source: {name: report}."""
    return {name: compressed(name) for name in METHODS}


def fp32_source(workdir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workdir / "source").eval()


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(["今天天气很好，我们热爱和平"], return_tensors="pt")).logits


def saved_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_method_reloads_in_a_new_process_and_generates(outputs, workdir):
    script = (
        "import sys\n"
        "from llmkit.loading import load_model\n"
        "from llmkit.generation import generate_text\n"
        "from llmkit.settings import GenerateSettings\n"
        "for path in sys.argv[1:]:\n"
        "    model, tokenizer = load_model(path)\n"
        "    generation = generate_text(model, tokenizer, '今天', GenerateSettings(greedy=True, max_new_tokens=3))\n"
        "    layer = type(model.model.layers[0].mlp.down_proj)\n"
        "    print(path, f'{layer.__module__}.{layer.__qualname__}', generation.new_tokens)\n")
    result = subprocess.run([sys.executable, "-c", script, *(str(workdir / name) for name in METHODS)],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    layers = {Path(line.split()[0]).name: line.split()[1:] for line in result.stdout.splitlines()}
    assert all(tokens == "3" for _, tokens in layers.values()) and len(layers) == len(METHODS)
    assert layers["bnb-int8"][0].endswith(".Linear8bitLt") and layers["bnb-int8"][0].startswith("bitsandbytes.")
    assert layers["bnb-nf4"][0] == layers["bnb-fp4"][0] and layers["bnb-nf4"][0].endswith(".Linear4bit")
    # torch.ao's int8 layer is also called "Linear": the module path tells it from torch.nn's
    assert layers["dynamic-int8"][0] == "torch.ao.nn.quantized.dynamic.modules.linear.Linear"
    assert {layers[name][0] for name in ("prune", "mlp-units", "attention-heads")} == {"torch.nn.modules.linear.Linear"}


def test_dynamic_int8_loads_int8_linears_that_compute_as_quantizing_in_process(compressed, workdir):
    import copy

    from llmkit.loading import load_model
    from llmkit.compression import quantize_dynamic_int8

    compressed("dynamic-int8")
    loaded, tokenizer = load_model(str(workdir / "dynamic-int8"), device="cpu")
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    kinds = {type(layer.get_submodule(name)) for layer in loaded.model.layers for name in projections}
    assert kinds == {torch.ao.nn.quantized.dynamic.Linear}
    assert type(loaded.lm_head) is torch.nn.Linear and loaded.lm_head.weight.dtype == torch.float32
    fp32 = fp32_source(workdir)
    direct = quantize_dynamic_int8(copy.deepcopy(fp32))  # the saved weights are the source's, in fp32
    got, expected, unquantized = (logits(model, tokenizer) for model in (loaded, direct, fp32))
    assert torch.equal(got, expected)
    # int8 rounding shows in the logits (by ~6e-3 here): a quantization that did nothing would not
    assert (got - unquantized).abs().max().item() > 1e-4


def test_structured_pruning_saves_a_smaller_model_plain_transformers_loads(outputs, workdir):
    from transformers import AutoModelForCausalLM

    mlp = AutoModelForCausalLM.from_pretrained(workdir / "mlp-units")
    assert mlp.config.intermediate_size == 48 and mlp.model.layers[0].mlp.down_proj.weight.shape == (32, 48)
    heads = AutoModelForCausalLM.from_pretrained(workdir / "attention-heads")
    assert heads.config.num_attention_heads == 1 and heads.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    for name in ("mlp-units", "attention-heads"):
        assert outputs[name]["after"]["parameters"] < outputs[name]["before"]["parameters"]


def kept_blocks(original, pruned, size: int = 1) -> list[int]:
    """Which row blocks (of `size` rows) of the original weight survive in the pruned one, in order: found
    by value, not by pruning's own rule."""
    old, new = original.reshape(-1, size * original.shape[1]), pruned.reshape(-1, size * pruned.shape[1])
    kept = [next(i for i, block in enumerate(old) if torch.equal(block, row)) for row in new]
    assert kept == sorted(set(kept))
    return kept


def test_removing_mlp_units_equals_zeroing_the_weakest_units_of_the_original(compressed, workdir):
    from transformers import AutoModelForCausalLM

    compressed("mlp-units")
    original, pruned = fp32_source(workdir), AutoModelForCausalLM.from_pretrained(workdir / "mlp-units").eval()
    tokenizer = char_tokenizer()
    with torch.no_grad():
        for big, small in zip(original.model.layers, pruned.model.layers, strict=True):
            mlp = big.mlp
            kept = kept_blocks(mlp.gate_proj.weight, small.mlp.gate_proj.weight)
            removed = sorted(set(range(mlp.gate_proj.out_features)) - set(kept))
            assert len(removed) == 16  # 25% of 64 units
            # magnitude pruning: the removed units are the ones whose in and out weights are smallest
            score = (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
                     * mlp.down_proj.weight.norm(dim=0))
            assert score[removed].max() < score[kept].min()
            mlp.gate_proj.weight[removed] = 0
            mlp.up_proj.weight[removed] = 0
            mlp.down_proj.weight[:, removed] = 0
    # a removed unit contributed nothing else: the smaller model computes what the zeroed original does
    assert torch.allclose(logits(pruned, tokenizer), logits(original, tokenizer), rtol=0, atol=1e-5)


def test_removing_a_head_group_equals_zeroing_it_in_the_original(compressed, workdir):
    from transformers import AutoModelForCausalLM

    compressed("attention-heads")
    original, pruned = fp32_source(workdir), AutoModelForCausalLM.from_pretrained(workdir / "attention-heads").eval()
    tokenizer = char_tokenizer()
    head_dim = original.config.hidden_size // original.config.num_attention_heads  # 16; 2 groups of 1 head
    with torch.no_grad():
        for big, small in zip(original.model.layers, pruned.model.layers, strict=True):
            attention = big.self_attn
            kept = kept_blocks(attention.v_proj.weight, small.self_attn.v_proj.weight, head_dim)
            removed = [group for group in range(2) if group not in kept]
            assert len(removed) == 1
            # the weaker group goes: by the norms of its value and output weights
            score = (attention.v_proj.weight.view(2, -1).norm(dim=1)
                     * attention.o_proj.weight.t().reshape(2, -1).norm(dim=1))
            assert score[removed].max() < score[kept].min()
            rows = slice(removed[0] * head_dim, (removed[0] + 1) * head_dim)
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                projection.weight[rows] = 0
            attention.o_proj.weight[:, rows] = 0
    assert torch.allclose(logits(pruned, tokenizer), logits(original, tokenizer), rtol=0, atol=1e-5)


def test_unstructured_pruning_zeroes_the_share_asked_for(outputs):
    report = outputs["prune"]
    assert report["after"]["zero_weights"] == pytest.approx(0.5, abs=0.01) and report["before"]["zero_weights"] < 0.01


def test_report_is_measured_from_the_saved_files(outputs, workdir):
    from llmkit.evaluate import run as evaluate

    def file_bytes(folder):
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))

    def count(folder):
        return sum(t.numel() for t in saved_tensors(folder).values())

    eval_recipe = load_recipe(None, [f"eval.output={workdir / 'eval.json'}", *[
        f"eval.tasks=[{{kind = 'perplexity', source = '{workdir / 'text.txt'}', context_length = 16, stride = 8}}]"]])
    reports = {name: json.loads((workdir / name / REPORT_FILE).read_text(encoding="utf-8")) for name in outputs}
    results = evaluate(eval_recipe, models=[str(workdir / "source"), *(str(workdir / name) for name in reports)])
    source = workdir / "source"
    for (name, report), result in zip(reports.items(), results[1:], strict=True):
        folder, before, after = workdir / name, report["before"], report["after"]
        # `llmkit eval` on the source and on the saved folder gives the reported figures
        assert before["metrics"]["perplexity"] == pytest.approx(results[0].metrics["perplexity"], rel=1e-6)
        assert after["metrics"]["perplexity"] == pytest.approx(result.metrics["perplexity"], rel=1e-6), name
        assert (before["weights_bytes"], after["weights_bytes"]) == (file_bytes(source), file_bytes(folder))
        assert before["parameters"] == count(source)
        if name.startswith("bnb-"):  # packed weights and their scales: the files hold no 1:1 count
            assert after["parameters"] == before["parameters"]  # quantizing keeps every weight
        else:  # fp32 files (dynamic-int8 quantizes as it loads): one number per parameter
            assert after["parameters"] == count(folder)
        assert "## Quantization report" in (folder / "README.md").read_text(encoding="utf-8")
    assert reports["bnb-nf4"]["change_ratio"]["weights_bytes"] < 0.5
    for name in ("bnb-nf4", "prune", "dynamic-int8"):
        assert reports[name]["after"]["metrics"]["perplexity"] != reports[name]["before"]["metrics"]["perplexity"]
    # unstructured pruning: the zero share reported is the share of zeros in the saved layer matrices
    matrices = [t for k, t in saved_tensors(workdir / "prune").items() if ".layers." in k and t.dim() == 2]
    zeros = sum(int((t == 0).sum()) for t in matrices) / sum(t.numel() for t in matrices)
    assert reports["prune"]["after"]["zero_weights"] == pytest.approx(zeros, abs=1e-12)


def test_recovery_fine_tune_keeps_the_pruned_weights_zero(workdir, tiny):
    report = run(load_recipe(None, tiny + quick(workdir, "recovered", "quantize.method=prune",
                                               "quantize.recovery_steps=2")))
    assert report["details"]["recovery"]["steps"] == 2
    assert report["after"]["zero_weights"] == pytest.approx(0.5, abs=0.01)


def test_bad_input_and_a_second_run_leave_the_source_byte_identical(outputs, workdir):
    source = workdir / "source"
    before = digest(source)
    quick_form = ["quantize", "--model", str(source), "--method", "nf4", "--output", str(workdir / "cli-nf4"),
                  "--set", f"quantize.task.source={workdir / 'text.txt'}", "--set", "quantize.speed_tokens=2",
                  "--set", "quantize.speed_runs=1"]
    first = runner.invoke(app, quick_form)
    assert first.exit_code == 0, first.output
    assert json.loads((workdir / "cli-nf4" / REPORT_FILE).read_text(encoding="utf-8"))["method"] == "bnb-nf4"
    bad = {
        "exists; pass --overwrite": quick_form,
        "already quantized (bitsandbytes)": [*quick_form[:2], str(workdir / "bnb-int8"), *quick_form[3:5], "--output",
                                             str(workdir / "again")],
        "quantize.sparsity must be in (0, 1)": [*quick_form, "--method", "prune", "--sparsity", "1.5"],
        "quantize.method must be one of": [*quick_form, "--method", "gptq"],
        "cannot be the source model": [*quick_form, "--output", str(source), "--overwrite"],
        "removes 0": [*quick_form, "--method", "prune", "--set", "quantize.structure=attention-heads",
                      "--sparsity", "0.1", "--output", str(workdir / "none")],
    }
    for message, arguments in bad.items():
        result = runner.invoke(app, arguments)
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            (message, result.stderr)
    assert not (workdir / "again").exists() and not (workdir / "none").exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")]  # no half-written folders left
    assert digest(source) == before


def test_recipe_settings_are_checked():
    with pytest.raises(LlmkitError, match="quantize.recovery_steps needs method"):
        load_recipe(None, ["quantize.method=bnb-nf4", "quantize.recovery_steps=10"])


def test_four_bit_keeps_narrow_layers_unquantized_and_says_so(compressed, workdir):
    """The tiny source (hidden 32) has layers too narrow for bitsandbytes' 4-bit blocks: they stay in full
    precision (on every CPU alike), the others are 4-bit, and the report and the model card name them."""
    import bitsandbytes as bnb
    import torch

    from llmkit.loading import load_model

    kept = compressed("bnb-nf4")["details"]["kept_in_full_precision"]
    assert sorted(kept["layers"]) == sorted(f"layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))
    assert "multiple of 64" in kept["why"]
    assert "12 linear layer(s) kept in full precision" in (workdir / "bnb-nf4" / "README.md").read_text()
    model, _ = load_model(str(workdir / "bnb-nf4"))
    layers = dict(model.model.named_modules())
    for name in kept["layers"]:
        assert type(layers[name]) is torch.nn.Linear
    assert all(isinstance(layers[f"layers.{i}.mlp.down_proj"], bnb.nn.Linear4bit) for i in range(2))
