"""Images as prompts end to end (llmkit/vision.py): a tiny vision-language model built from config, trained a
few steps on generated pictures (weights change, loss falls), saved, reloaded in a new process by plain
transformers (AutoModelForImageTextToText + AutoProcessor) and asked about a picture; `llmkit generate
--image` with its attention picture, `llmkit eval`; bad input: one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback
from typer.testing import CliRunner

from llmkit import finetune, load_recipe, scenes
from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.loading import load_model
from llmkit.vision import describe, open_image

from .conftest import char_tokenizer, save_tiny_model

runner = CliRunner()
TINY_VLM = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.max_positions=64", "vision.image_size=16",
            "vision.patch_size=8", "vision.n_layer=1", "vision.n_head=2", "vision.d_model=32", "train.max_steps=8",
            "train.eval_every=4", "train.batch_size=8", "train.log_every=1", "train.eval_batch_size=16",
            "train.learning_rate=3e-3", "train.warmup_steps=0", "train.precision=fp32", "finetune.max_length=64"]


def scene_folder(folder, count: int) -> None:
    """Generated pictures with their captions: folder/rows.jsonl names folder/pics/N.png."""
    import random

    rng = random.Random(0)
    (folder / "pics").mkdir(parents=True)
    rows = []
    for number in range(count):
        scene = scenes.random_scene(rng, held_out=False)
        scenes.render(scene, size=32).save(folder / "pics" / f"{number}.png")
        rows.append({"image": f"pics/{number}.png", "text": scenes.caption(scene)})
    (folder / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class FirstWeights(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A caption model trained for 8 steps on 40 pictures: (its folder, the data folder, weights before training)."""
    folder = tmp_path_factory.mktemp("vlm")
    scene_folder(folder / "data", 40)
    recipe = load_recipe("caption", [f"run.output_dir={folder / 'runs'}", "run.name=vlm",
                                     f"finetune.source={folder / 'data' / 'rows.jsonl'}",
                                     f"finetune.test_source={folder / 'data' / 'rows.jsonl'}",
                                     "finetune.validation_fraction=0.2", *TINY_VLM])
    first = FirstWeights()
    torch.manual_seed(0)
    run_dir = finetune.run(recipe, callbacks=[first]).run_dir
    return run_dir, folder / "data", first.weights


def test_a_tiny_vlm_trains_saves_and_plain_transformers_reloads_it_in_a_new_process(trained):
    run_dir, data, before = trained
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in history if "loss" in row and "eval_loss" not in row]
    assert losses[-1] < losses[0]
    model, processor = load_model(str(run_dir), head="image-text-to-text")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    after = model.state_dict()
    for part in ("patch_embedding.weight", "multi_modal_projector.linear_1.weight", "embed_tokens.weight"):
        name = next(key for key in after if key.endswith(part))  # the encoder, the projector, the language model
        assert not torch.equal(after[name], before[name]), name
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert {"attribute_accuracy", "exact_match", "bleu", "chrf", "baseline_attribute_accuracy"} <= set(final["test"])
    picture = str(data / "pics" / "0.png")
    ours = describe(model, processor, [picture], [scenes.CAPTION_PROMPT])[0]
    script = f"""
import json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
processor = AutoProcessor.from_pretrained(sys.argv[1])
inputs = processor(images=[Image.open(sys.argv[2])], text=["<image>{scenes.CAPTION_PROMPT}"], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:]
print(json.dumps([type(model).__name__, type(processor).__name__, processor.decode(new, skip_special_tokens=True)]))
"""
    result = subprocess.run([sys.executable, "-c", script, str(run_dir), picture], capture_output=True, text=True,
                            timeout=120, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr
    name, processor_name, text = json.loads(result.stdout.strip().splitlines()[-1])
    assert (name, processor_name) == ("LlavaForConditionalGeneration", "LlavaProcessor")
    assert ours.startswith(text) and text  # llmkit's greedy caption, cut at the same 8 tokens


def test_generate_describes_several_pictures_and_draws_where_the_words_look(trained, tmp_path):
    run_dir, data, _ = trained
    pictures = [str(data / "pics" / f"{n}.png") for n in (0, 1)]
    plot = tmp_path / "look.png"
    result = runner.invoke(app, ["generate", "--model", str(run_dir), "--image", pictures[0], "--image", pictures[1],
                                 "--greedy", "--max-new-tokens", "6", "--attention-plot", str(plot)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == pictures
    model, processor = load_model(str(run_dir), head="image-text-to-text")
    from llmkit.settings import GenerateSettings

    expected = describe(model, processor, pictures, [scenes.CAPTION_PROMPT] * 2,
                        GenerateSettings(greedy=True, max_new_tokens=6))
    assert [line.split("\t")[1] for line in lines] == expected
    assert Image.open(plot).size[0] > 100
    (tmp_path / "batch.jsonl").write_text(json.dumps({"image": pictures[0], "prompt": "图中有几个圆？", "id": 7}) + "\n")
    result = runner.invoke(app, ["generate", "--model", str(run_dir), "--input", str(tmp_path / "batch.jsonl"),
                                 "--output", str(tmp_path / "out.jsonl"), "--greedy", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["id"] == 7 and isinstance(row["generated"], str)


def test_eval_scores_a_caption_model_beside_the_text_only_baseline(trained, tmp_path, recipe_file):
    run_dir, data, _ = trained
    recipe = recipe_file(f"""
[eval]
output = "{tmp_path / 'eval.json'}"
[[eval.tasks]]
kind = "caption"
source = "{data / 'rows.jsonl'}"
split = "all"
""")
    result = runner.invoke(app, ["eval", str(recipe), "--model", str(run_dir), "--limit", "6"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval.json").read_text())["results"][0]["metrics"]
    assert 0 <= metrics["attribute_accuracy"] <= 1 and "chrf" in metrics and "attribute_accuracy" in result.stdout


def test_a_missing_or_non_image_file_and_a_text_only_model_are_one_line_errors(trained, tmp_path):
    run_dir, _, _ = trained
    (tmp_path / "notes.png").write_text("hello")
    for picture, message in ((tmp_path / "nothing.png", "image not found"), (tmp_path / "notes.png", "is not an image")):
        result = runner.invoke(app, ["generate", "--model", str(run_dir), "--image", str(picture)])
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    text_only = save_tiny_model(tmp_path / "llama", "LlamaForCausalLM", char_tokenizer())
    result = runner.invoke(app, ["finetune", "caption", "--set", f"model.path={text_only}",
                                 "--set", f"run.output_dir={tmp_path / 'runs'}"])
    assert result.exit_code == 2 and "text-only llama model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
    result = runner.invoke(app, ["generate", "--model", str(text_only), "--image", str(tmp_path / "notes.png")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_a_much_larger_picture_is_resized_and_said_once(tmp_path, capsys):
    Image.new("RGB", (400, 300), "white").save(tmp_path / "big.png")
    from llmkit import report

    report._warned.clear()
    for _ in range(2):
        assert open_image(tmp_path / "big.png", side=32).size == (400, 300)  # the processor resizes it
    assert capsys.readouterr().err.count("resized") == 1
    with pytest.raises(LlmkitError, match="image not found"):
        open_image(tmp_path / "none.png")


def test_lora_on_the_language_model_of_a_trained_vlm_leaves_its_encoder_as_it_was(trained, tmp_path):
    run_dir, data, _ = trained
    recipe = load_recipe("caption", [f"run.output_dir={tmp_path / 'runs'}", "run.name=lora", f"model.path={run_dir}",
                                     "finetune.method=lora", "vision.freeze_tower=true",
                                     f"finetune.source={data / 'rows.jsonl'}", 'finetune.test_source=""',
                                     "finetune.validation_fraction=0.2", *TINY_VLM, "train.max_steps=2",
                                     "train.eval_every=2"])
    adapter = finetune.run(recipe).run_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "language_model" in config["target_modules"] and config["modules_to_save"] == ["multi_modal_projector"]
    base, _ = load_model(str(run_dir), head="image-text-to-text")
    tuned, processor = load_model(str(adapter), head="image-text-to-text")  # merged onto its base
    before, after = base.state_dict(), tuned.state_dict()
    encoder = [name for name in before if "vision_tower" in name]
    assert encoder and all(torch.equal(before[name], after[name]) for name in encoder)
    changed = [name for name in before if "language_model" in name and not torch.equal(before[name], after[name])]
    assert changed and all(name.endswith("proj.weight") for name in changed)
    assert describe(tuned, processor, [str(data / "pics" / "0.png")], [scenes.CAPTION_PROMPT])
