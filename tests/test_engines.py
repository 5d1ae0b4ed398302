"""llmkit/engines.py: the CTranslate2 engine behind llmkit.generation, against transformers on the same
tiny random llama (no training, no download): greedy token ids identical in float32, streaming, stop
strings, seeds, end ids from generation_config.json, logits for perplexity, and how an engine is picked.
Skipped as a whole only where the ctranslate2 wheel cannot be installed."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.settings import GenerateSettings

torch = pytest.importorskip("torch")
pytest.importorskip("ctranslate2", reason="the ct2 engine's wheel (pip install 'llmkit[fast]') is not installable here")

from llmkit import engines, loading  # noqa: E402
from llmkit.generation import ChatSession, generate_batch, generate_text  # noqa: E402
from tests.conftest import char_tokenizer, problems, save_tiny_model  # noqa: E402

runner = CliRunner()
GREEDY = GenerateSettings(max_new_tokens=40, greedy=True, repetition_penalty=1.0)
SAMPLE = GenerateSettings(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
PROMPTS = ["昨天天气很", "今天", "我们的国家", "经济发展"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("engines") / "model", "LlamaForCausalLM", char_tokenizer(),
                             d_model=64)
    engines.export_ct2(str(folder), folder / engines.EXPORT_DIR)
    return folder


@pytest.fixture(scope="module")
def both(model_dir):
    hf = engines.load_generator(str(model_dir), engine="hf")
    ct2 = engines.load_generator(str(model_dir), engine="ct2", threads=1)
    assert not isinstance(hf[0], engines.Ct2Model) and isinstance(ct2[0], engines.Ct2Model)
    return hf, ct2


@pytest.mark.parametrize("penalty", [1.0, 1.3])  # 1.3: the penalty covers the prompt, as in transformers
def test_greedy_ids_are_transformers_ids(both, penalty):
    (hf, hf_tokenizer), (ct2, tokenizer) = both
    settings = replace(GREEDY, repetition_penalty=penalty)
    for prompt in PROMPTS:
        expected = generate_text(hf, hf_tokenizer, prompt, settings)
        got = generate_text(ct2, tokenizer, prompt, settings)
        assert got.ids == expected.ids and got.text == expected.text
        assert got.new_tokens == expected.new_tokens == settings.max_new_tokens
    # batches of prompts of unequal length, padded on the left: the same texts as one by one
    single = generate_batch(hf, hf_tokenizer, PROMPTS, settings)
    assert generate_batch(ct2, tokenizer, PROMPTS, settings, batch_size=3) == single
    assert len({texts[0] for texts in single}) == len(PROMPTS)


def test_streaming_and_stop_strings(both):
    (hf, hf_tokenizer), (ct2, tokenizer) = both
    full = generate_text(hf, hf_tokenizer, "今天", GREEDY).text
    stop = full[5]
    for settings in (GREEDY, replace(GREEDY, stop=[stop])):
        pieces: list[str] = []
        streamed = generate_text(ct2, tokenizer, "今天", settings, stream=pieces.append)
        assert "".join(pieces) == streamed.text == generate_text(hf, hf_tokenizer, "今天", settings).text
        assert len(pieces) > 1 and streamed.first_token_seconds is not None
    stopped = generate_text(ct2, tokenizer, "今天", replace(GREEDY, stop=[stop]))
    assert stopped.text == full[:full.index(stop)]
    assert stopped.new_tokens <= full.index(stop) + 1 < GREEDY.max_new_tokens  # generation ended there
    # stop strings in a batch end each row on its own
    rows = generate_batch(ct2, tokenizer, ["今天", "我们的国家"], replace(GREEDY, stop=[stop]))
    assert rows[0] == [stopped.text]


def test_sampling_and_beams(both):
    """Sampling samples (CTranslate2's generator: not repeatable by seed, issue #1757); beams are beams."""
    _, (ct2, tokenizer) = both
    # temperature 1 over ~1400 tokens of a random model: two equal 8-token samples are practically impossible
    texts = [generate_text(ct2, tokenizer, "昨天天气很", SAMPLE, seed=0).text for _ in range(4)]
    assert len(set(texts)) == len(texts)
    several = generate_text(ct2, tokenizer, "今天", replace(SAMPLE, num_return_sequences=3), seed=0)
    assert len(set(several.texts)) == 3 and several.new_tokens == 3 * SAMPLE.max_new_tokens
    for penalty in (1.0, 1.3):  # 1.3: prompts of unequal length decoded again, one call per length
        settings = replace(GREEDY, max_new_tokens=8, num_beams=4, num_return_sequences=2, repetition_penalty=penalty)
        beams = generate_batch(ct2, tokenizer, PROMPTS, settings)
        assert [len(set(texts)) for texts in beams] == [2] * len(PROMPTS)
        assert beams == [generate_text(ct2, tokenizer, prompt, settings).texts for prompt in PROMPTS]


def test_chat_session_runs_on_the_engine(both):
    (hf, hf_tokenizer), (ct2, tokenizer) = both
    replies = [ChatSession(model, tok, replace(GREEDY, max_new_tokens=6)).reply("你好").text
               for model, tok in ((hf, hf_tokenizer), (ct2, tokenizer))]
    assert replies[0] == replies[1]


def test_logits_for_perplexity(both):
    (hf, hf_tokenizer), (ct2, _) = both
    ids = torch.tensor([hf_tokenizer("今天天气很好")["input_ids"]] * 2)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    assert torch.allclose(ct2(input_ids=ids).logits, expected, atol=1e-4)
    with pytest.raises(LlmkitError, match="unpadded input_ids only"):
        ct2(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_the_export_keeps_the_models_generation_config(model_dir, tmp_path):
    """End ids (a list) and sampling defaults come from the model's generation_config.json on both engines."""
    import shutil

    from transformers import GenerationConfig

    from llmkit.generation import DEFAULT_SAMPLING, generation_kwargs

    hf, tokenizer = loading.load_model(str(model_dir))
    first = generate_text(hf, tokenizer, "今天", replace(GREEDY, max_new_tokens=1)).ids[-1]
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(model_dir, elsewhere, ignore=shutil.ignore_patterns(engines.EXPORT_DIR))
    config = GenerationConfig.from_model_config(hf.config)
    config.update(do_sample=True, temperature=0.3, top_k=7, eos_token_id=[tokenizer.eos_token_id, first])
    config.save_pretrained(elsewhere)
    engines.export_ct2(str(elsewhere), elsewhere / engines.EXPORT_DIR)
    ct2, ct2_tokenizer = engines.load_generator(str(elsewhere), engine="ct2")
    kwargs = generation_kwargs(GenerateSettings(), ct2_tokenizer, ct2)
    assert kwargs["eos_token_id"] == [tokenizer.eos_token_id, first]
    assert {key: kwargs[key] for key in DEFAULT_SAMPLING} == {**DEFAULT_SAMPLING, "temperature": 0.3, "top_k": 7}
    stopped = generate_text(ct2, ct2_tokenizer, "今天", GREEDY)  # its first token is one of the end ids
    assert stopped.new_tokens == 1 and stopped.ids[-1] == first


def test_auto_picks_the_export_when_it_matches_the_weights(model_dir, tmp_path):
    import shutil

    assert isinstance(engines.load_generator(str(model_dir))[0], engines.Ct2Model)  # auto
    assert isinstance(engines.load_generator(str(model_dir / engines.EXPORT_DIR))[0], engines.Ct2Model)
    with pytest.raises(LlmkitError, match="is a CTranslate2 export: use --engine ct2"):
        engines.load_generator(str(model_dir / engines.EXPORT_DIR), engine="hf")
    with pytest.raises(LlmkitError, match="--engine must be one of auto, hf, ct2"):
        engines.load_generator(str(model_dir), engine="fast")
    with pytest.raises(LlmkitError, match="--device mps: the ct2 engine runs on cpu or cuda"):
        engines.load_generator(str(model_dir), device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(LlmkitError, match=r"cannot load the CTranslate2 export .* --dtype float16"):
            engines.load_generator(str(model_dir), device="cpu", dtype="float16")
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns(engines.EXPORT_DIR))
    assert not isinstance(engines.load_generator(str(bare))[0], engines.Ct2Model)
    with pytest.raises(LlmkitError, match="has no CTranslate2 export; make it with `llmkit export"):
        engines.load_generator(str(bare), engine="ct2")
    # weights changed after the export (trained on, replaced): auto falls back, ct2 says why
    shutil.copytree(model_dir / engines.EXPORT_DIR, bare / engines.EXPORT_DIR)
    weights = bare / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert not isinstance(engines.load_generator(str(bare))[0], engines.Ct2Model)
    with pytest.raises(LlmkitError, match="made from other weights"):
        engines.load_generator(str(bare), engine="ct2")


def test_cli_engines_print_the_same_text(model_dir):
    outputs = {}
    for engine in ("hf", "ct2"):
        result = runner.invoke(app, ["generate", "--model", str(model_dir), "--prompt", "今天", "--greedy",
                                     "--max-new-tokens", "12", "--engine", engine, "--threads", "1"])
        assert result.exit_code == 0, result.output
        assert ("engine: ct2" in result.stderr) == (engine == "ct2")
        assert problems(result.stderr.replace(f"engine: ct2 ({model_dir / 'ct2'})\n", "")) == \
            [line for line in result.stderr.splitlines() if "new tokens in" in line]
        outputs[engine] = result.stdout
    assert outputs["hf"] == outputs["ct2"] and len(outputs["hf"]) > len("今天\n")
    result = runner.invoke(app, ["generate", "--model", str(model_dir), "--prompt", "今天", "--engine", "ct2",
                                 "--attention-plot", "a.png"])
    assert result.exit_code == 2 and "--attention-plot needs the transformers model" in result.stderr
    result = runner.invoke(app, ["generate", "--model", str(model_dir), "--prompt", "今天", "--threads", "-1"])
    assert result.exit_code == 2 and "threads" in result.stderr


def test_eval_scores_perplexity_and_generation_on_the_engine(model_dir, tmp_path, recipe_file):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"text": p + "很好。", "prompt": p, "reference": "很好"}, ensure_ascii=False)
                            + "\n" for p in PROMPTS), encoding="utf-8")
    recipe = recipe_file(f"""
[eval]
output = "{tmp_path / 'eval.json'}"
[[eval.tasks]]
kind = "perplexity"
source = "{data}"
[[eval.tasks]]
kind = "generation"
source = "{data}"
max_new_tokens = 6
""")
    scores = {}
    for engine in ("hf", "ct2"):
        result = runner.invoke(app, ["eval", str(recipe), "--model", str(model_dir), "--engine", engine])
        assert result.exit_code == 0, result.output
        rows = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["results"]
        assert {row["metrics"]["engine"] for row in rows} == {engine}
        scores[engine] = [row["metrics"] for row in rows]
    hf, ct2 = scores["hf"], scores["ct2"]
    assert ct2[0]["perplexity"] == pytest.approx(hf[0]["perplexity"], rel=1e-4) and hf[0]["perplexity"] > 100
    assert ct2[1]["chrf"] == hf[1]["chrf"] and ct2[1]["bleu"] == hf[1]["bleu"]
