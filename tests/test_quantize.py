"""llmkit quantize on a tiny random Llama: every method saves a model that reloads in a new process and
generates; the report is measured from the saved files; the source is never touched."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
def outputs(workdir):
    """Every method run once on the tiny source: {name: report}."""
    return {name: run(load_recipe(None, quick(workdir, name, *overrides))) for name, overrides in METHODS.items()}


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_method_reloads_in_a_new_process_and_generates(outputs, workdir):
    script = (
        "import sys\n"
        "from llmkit.models import load_model\n"
        "from llmkit.generate import generate_text\n"
        "from llmkit.settings import GenerateSettings\n"
        "for path in sys.argv[1:]:\n"
        "    model, tokenizer = load_model(path)\n"
        "    generation = generate_text(model, tokenizer, '今天', GenerateSettings(greedy=True, max_new_tokens=3))\n"
        "    print(path, type(model.model.layers[0].mlp.up_proj).__name__, generation.new_tokens)\n")
    result = subprocess.run([sys.executable, "-c", script, *(str(workdir / name) for name in METHODS)],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    layers = {Path(line.split()[0]).name: line.split()[1:] for line in result.stdout.splitlines()}
    assert all(tokens == "3" for _, tokens in layers.values()) and len(layers) == len(METHODS)
    assert layers["bnb-int8"][0] == "Linear8bitLt" and layers["bnb-nf4"][0] == layers["bnb-fp4"][0] == "Linear4bit"
    assert layers["dynamic-int8"][0] == "Linear" and "dynamic" in outputs["dynamic-int8"]["details"]["applied"]


def test_structured_pruning_saves_a_smaller_model_plain_transformers_loads(outputs, workdir):
    from transformers import AutoModelForCausalLM

    mlp = AutoModelForCausalLM.from_pretrained(workdir / "mlp-units")
    assert mlp.config.intermediate_size == 48 and mlp.model.layers[0].mlp.down_proj.weight.shape == (32, 48)
    heads = AutoModelForCausalLM.from_pretrained(workdir / "attention-heads")
    assert heads.config.num_attention_heads == 1 and heads.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    for name in ("mlp-units", "attention-heads"):
        assert outputs[name]["after"]["parameters"] < outputs[name]["before"]["parameters"]


def test_unstructured_pruning_zeroes_the_share_asked_for(outputs):
    report = outputs["prune"]
    assert report["after"]["zero_weights"] == pytest.approx(0.5, abs=0.01) and report["before"]["zero_weights"] < 0.01


def test_report_is_measured_from_the_saved_files(outputs, workdir):
    from llmkit.evaluate import run as evaluate

    for name, report in outputs.items():
        saved = json.loads((workdir / name / REPORT_FILE).read_text(encoding="utf-8"))
        assert saved["after"] == report["after"]
        weights = sum(p.stat().st_size for p in (workdir / name).glob("*.safetensors"))
        assert report["after"]["weights_bytes"] == weights
        assert "## Quantization report" in (workdir / name / "README.md").read_text(encoding="utf-8")
    assert outputs["bnb-nf4"]["change_ratio"]["weights_bytes"] < 0.5
    eval_recipe = load_recipe(None, [f"eval.output={workdir / 'eval.json'}", *[
        f"eval.tasks=[{{kind = 'perplexity', source = '{workdir / 'text.txt'}', context_length = 16, stride = 8}}]"]])
    for name in ("bnb-nf4", "prune"):  # `llmkit eval` on the saved folder gives the reported figure
        metrics = evaluate(eval_recipe, models=[str(workdir / name)])[0].metrics
        assert metrics["perplexity"] == pytest.approx(outputs[name]["after"]["metrics"]["perplexity"], rel=1e-6)
        assert metrics["perplexity"] != outputs[name]["before"]["metrics"]["perplexity"]


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
