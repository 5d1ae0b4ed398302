"""llmkit generate, on a tiny random llama with a char tokenizer (no training, no download). Covers the
command (llmkit/generate.py), the generation library under it (llmkit/generation.py) and the attention
heatmaps of llmkit/report.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.settings import GenerateSettings

torch = pytest.importorskip("torch")

from llmkit import generate, loading, report  # noqa: E402
from llmkit.generation import ChatSession, generate_batch, generate_text  # noqa: E402
from tests.conftest import char_tokenizer, save_tiny_model  # noqa: E402

runner = CliRunner()
GREEDY = GenerateSettings(max_new_tokens=8, greedy=True, repetition_penalty=1.0)
SAMPLE = GenerateSettings(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def build_tiny(path, d_model=32, chat_template=None):
    tokenizer = char_tokenizer()
    if chat_template:
        tokenizer.chat_template = chat_template
    return save_tiny_model(path, "LlamaForCausalLM", tokenizer, d_model=d_model)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return loading.load_model(str(tiny_dir))


def test_seeded_sampling_is_reproducible_and_seed_matters(tiny):
    model, tokenizer = tiny
    # Temperature 1 over all ~1400 tokens of a random model: two seeds giving the same 8 tokens is
    # practically impossible, so every seed must give its own text, and the same one each time.
    prompt_length = len(tokenizer("昨天天气很")["input_ids"])
    texts = []
    for seed in range(5):
        first = generate_text(model, tokenizer, "昨天天气很", SAMPLE, seed=seed)
        assert generate_text(model, tokenizer, "昨天天气很", SAMPLE, seed=seed).text == first.text
        assert first.new_tokens == len(first.ids) - prompt_length == SAMPLE.max_new_tokens
        texts.append(first.text)
    assert len(set(texts)) == len(texts)


def test_stop_string_cuts_text_and_ends_generation(tiny):
    model, tokenizer = tiny
    full = generate_text(model, tokenizer, "今天", GREEDY).text
    stop = full[3]
    stopped = generate_text(model, tokenizer, "今天", replace(GREEDY, stop=[stop]))
    assert stopped.text == full[:full.index(stop)]
    assert stopped.new_tokens <= full.index(stop) + 1 < GREEDY.max_new_tokens


def test_streaming_equals_non_streaming_greedy(tiny):
    model, tokenizer = tiny
    for settings in (GREEDY, replace(GREEDY, stop=["\u3002"])):
        pieces: list[str] = []
        streamed = generate_text(model, tokenizer, "我们", settings, stream=pieces.append)
        plain = generate_text(model, tokenizer, "我们", settings)
        assert "".join(pieces) == streamed.text == plain.text
        assert len(pieces) > 1 and streamed.first_token_seconds is not None


def test_batch_matches_single_prompts_with_left_padding(tiny):
    model, tokenizer = tiny
    prompts = ["昨天天气很", "今天", "我们的国家"]
    batched = generate_batch(model, tokenizer, prompts, GREEDY, batch_size=2)
    single = [generate_text(model, tokenizer, p, GREEDY).text for p in prompts]
    assert [texts[0] for texts in batched] == single
    with pytest.raises(LlmkitError, match="prompt 2: empty prompt"):
        generate_batch(model, tokenizer, ["a", " "], GREEDY)


def test_batch_files_keep_fields_and_order(tiny, tmp_path):
    model, tokenizer = tiny
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"id": 1, "prompt": "今天"}\n\n{"id": 2, "prompt": "我们", "tag": "x"}\n', encoding="utf-8")
    out = tmp_path / "results.jsonl"
    generate.run_batch(model, tokenizer, source, out, GREEDY)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["prompt"]) for r in rows] == [(1, "今天"), (2, "我们")] and rows[1]["tag"] == "x"
    assert rows[0]["generated"] == generate_text(model, tokenizer, "今天", GREEDY).text
    text_source = tmp_path / "prompts.txt"
    text_source.write_text("今天\n我们\n", encoding="utf-8")
    text_out = tmp_path / "results.txt"
    generate.run_batch(model, tokenizer, text_source, text_out, GREEDY)
    lines = text_out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and lines[0].startswith("今天") and lines[1].startswith("我们")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": \n', "bad.jsonl:2: not a JSON object"),
    ('{"text": "a"}\n', "bad.jsonl:1: no 'prompt' field"),
    ('{"prompt": ""}\n', "bad.jsonl:1: empty prompt"),
])
def test_bad_input_line_is_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LlmkitError, match=message):
        generate.read_prompts(path)


def test_adapter_directory_loads_onto_its_base(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model, tokenizer = loading.load_model(str(tmp_path / "adapter"))
    ids = torch.tensor([tokenizer("今天")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, lora(ids).logits, atol=1e-5)
        assert not torch.allclose(model(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits)
    assert generate_text(model, tokenizer, "今天", GREEDY).text


def test_quantized_directory_loads_as_saved(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = build_tiny(tmp_path / "full", d_model=64)
    quantized = AutoModelForCausalLM.from_pretrained(source, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                     device_map={"": "cpu"})
    quantized.save_pretrained(tmp_path / "int8")
    (tmp_path / "int8" / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    (tmp_path / "int8" / "tokenizer_config.json").write_bytes((source / "tokenizer_config.json").read_bytes())
    assert "quantization_config" in json.loads((tmp_path / "int8" / "config.json").read_text())
    model, tokenizer = loading.load_model(str(tmp_path / "int8"))
    assert getattr(model, "is_loaded_in_8bit", False) or model.config.quantization_config
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    # The saved weights, not a fresh init: int8 logits stay within rounding of the fp32 model's (~0.007
    # here), while a random model's are ~0.8 away.
    ids = torch.tensor([tokenizer("今天天气很好")["input_ids"]])
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(source)(ids).logits
        assert torch.allclose(model(ids).logits.float(), full, atol=0.05)
    assert generate_text(model, tokenizer, "今天", GREEDY).new_tokens == GREEDY.max_new_tokens


def test_chat_template_applied_to_history(tiny_dir, tmp_path):
    model, tokenizer = loading.load_model(str(tiny_dir))
    tokenizer.chat_template = CHAT_TEMPLATE
    session = ChatSession(model, tokenizer, GREEDY, seed=0)
    first = session.reply("你好")
    expected = f"<s>user:你好\n<s>assistant:{first.text}\n<s>user:再见\n<s>assistant:"
    session.history.append({"role": "user", "content": "再见"})
    assert session.prompt_text() == expected
    assert session.prompt_ids() == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert session.prompt_ids().count(tokenizer.bos_token_id) == 4
    session.reset()
    assert session.history == []


def test_chat_without_template_continues_history_as_text(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, GREEDY)
    assert not session.templated
    reply = session.reply("你好")
    session.history.append({"role": "user", "content": "再见"})
    assert session.prompt_text() == f"你好\n{reply.text}\n再见"


def test_cli_chat_reset_exit_and_ctrl_d(tiny_dir):
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--chat", "--max-new-tokens", "3"],
                           input="你好\n/reset\n/exit\n")
    assert result.exit_code == 0 and "model> " in result.stdout and "history cleared" in result.stderr
    assert "no chat template" in result.stderr
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--chat", "--max-new-tokens", "3"],
                           input="你好\n")
    assert result.exit_code == 0


def test_latest_run_is_the_default(tiny_dir, tmp_path, monkeypatch):
    from llmkit.rundir import point_latest

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", "--prompt", "今天"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: no trained model found in runs/; train one with "
                                     "`llmkit pretrain pretrain-zh-tiny` or pass --model")
    run = tmp_path / "elsewhere" / "my-run"
    run.parent.mkdir()
    run.symlink_to(tiny_dir, target_is_directory=True)
    point_latest(run)
    assert Path(loading.resolve_model(None, "elsewhere")).resolve() == tiny_dir.resolve()
    (tmp_path / "elsewhere" / "latest").unlink()
    (tmp_path / "elsewhere" / "latest").write_text("my-run\n")  # where symlinks are not available
    assert loading.resolve_model(None, "elsewhere") == str(Path("elsewhere") / "my-run")
    result = runner.invoke(app, ["generate", "--set", "run.output_dir=elsewhere", "--prompt", "今天",
                                 "--greedy", "--max-new-tokens", "4"])
    assert result.exit_code == 0 and result.stdout.startswith("今天")


def test_cli_generates_clean_stdout_and_summary_on_stderr(tiny_dir, tiny, recipe_file):
    model, tokenizer = tiny
    recipe = recipe_file('[generate]\nmax_new_tokens = 4\ngreedy = true\nrepetition_penalty = 1.0\n')
    result = runner.invoke(app, ["generate", str(recipe), "--model", str(tiny_dir), "--prompt", "今天",
                                 "--max-new-tokens", "6"])
    assert result.exit_code == 0
    expected = "今天" + generate_text(model, tokenizer, "今天", replace(GREEDY, max_new_tokens=6)).text
    assert result.stdout == expected + "\n"
    assert "new tokens" in result.stderr and "tokens/s" in result.stderr and "first token" in result.stderr


def test_cli_seeds_and_stop(tiny_dir, tiny):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "今天", "--temperature", "1", "--top-k", "0",
            "--max-new-tokens", "6"]
    one, same, other = (runner.invoke(app, args + ["--seed", seed]).stdout for seed in ("3", "3", "4"))
    assert one == same != other
    # --seed reaches the generation: the library with that seed (and the CLI's defaults) writes the same text
    settings = GenerateSettings(temperature=1.0, top_k=0, max_new_tokens=6)
    assert one == "今天" + generate_text(*tiny, "今天", settings, seed=3).text + "\n"
    greedy = runner.invoke(app, args + ["--greedy"]).stdout.rstrip("\n")
    stopped = runner.invoke(app, args + ["--greedy", "--stop", greedy[4], "--stop", "never"]).stdout
    assert stopped == greedy[:greedy.index(greedy[4])] + "\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "error: --prompt: empty prompt"),
    (["--prompt", "x", "--top-p", "2"], "error: generate.top_p must be in (0, 1], got 2.0"),
    (["--prompt", "x", "--device", "tpu"], "error: --device: generate.device must be one of"),
    (["--prompt", "x", "--dtype", "float8"], "error: --dtype: generate.dtype must be one of"),
    (["--prompt", "x", "--model", "tests"], "error: tests: not a model (no config.json or adapter_config.json)"),
    (["--input", "BAD"], "bad.jsonl:2: not a JSON object"),
])
def test_cli_bad_input_exits_2_with_one_line(tiny_dir, tmp_path, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n', encoding="utf-8")
    args = [str(bad) if arg == "BAD" else arg for arg in args]
    model = [] if "--model" in args else ["--model", str(tiny_dir)]
    result = runner.invoke(app, ["generate", *model, *args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_cli_batch_writes_output(tiny_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("今天\n昨天\n我们\n", encoding="utf-8")
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--input", str(source), "--output",
                                 str(tmp_path / "out.jsonl"), "--batch-size", "2", "--max-new-tokens", "3"])
    assert result.exit_code == 0 and result.stdout == ""
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in rows] == ["今天", "昨天", "我们"] and all("generated" in row for row in rows)


def heatmap_cells(png: Path, axes, n: int):
    """The RGB colour at the centre of each of the n x n cells that `axes` drew into the saved png."""
    from PIL import Image

    with Image.open(png) as image:
        pixels = image.convert("RGB")
        box = axes.get_window_extent()  # pixels from the bottom left; the png's rows count from the top
        return torch.tensor([[pixels.getpixel((int(box.x0 + (col + 0.5) * box.width / n),
                                               int(pixels.height - box.y1 + (row + 0.5) * box.height / n)))
                              for col in range(n)] for row in range(n)])


def viridis(value: float):
    from matplotlib import colormaps

    return torch.tensor([round(255 * channel) for channel in colormaps["viridis"](value)[:3]])


def test_cli_attention_plot_draws_the_generated_text(tiny_dir, tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    from PIL import Image

    plotted, heatmaps = [], []
    real_plot, real_imshow = report.plot_attention, Axes.imshow
    monkeypatch.setattr(report, "plot_attention", lambda tokens, weights, *args: plotted.append((tokens, weights))
                        or real_plot(tokens, weights, *args))
    monkeypatch.setattr(Axes, "imshow", lambda axes, *args, **kwargs: heatmaps.append(axes)
                        or real_imshow(axes, *args, **kwargs))
    plot = tmp_path / "attn.png"
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "昨天天气很", "--greedy",
                                 "--max-new-tokens", "4", "--attention-plot", str(plot)])
    assert result.exit_code == 0, result.output
    # The plot covers <s> + the prompt + the 4 generated tokens, labelled with their text
    (tokens, weights), = plotted
    assert tokens[0] == "<s>" and "".join(tokens[1:]) == result.stdout.rstrip("\n") and len(tokens) == 10
    assert weights.shape == (2, 2, 10, 10)
    # Two layers side by side, 4 x 4 inches each at 100 dpi
    with Image.open(plot) as image:
        assert image.size == (800, 400)
    # Each heatmap shows causal attention: every future key in the colour of 0 (viridis: dark purple), the
    # first token's weight 1 on itself in the top colour (yellow), the rest of the past in many colours
    assert len(heatmaps) == 2
    future = torch.ones(10, 10, dtype=torch.bool).triu(1)
    for axes in heatmaps:
        cells = heatmap_cells(plot, axes, 10)
        assert ((cells[future] - viridis(0.0)).abs() <= 2).all()
        assert ((cells[0, 0] - viridis(1.0)).abs() <= 2).all()
        assert len({tuple(cell) for cell in cells[~future].tolist()}) > 10
    single = tmp_path / "one.png"
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "昨天", "--max-new-tokens", "2",
                                 "--attention-plot", str(single), "--attention-layer", "1", "--attention-head", "0"])
    assert result.exit_code == 0
    with Image.open(single) as image:
        assert image.size == (400, 400)  # one layer
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "昨天", "--max-new-tokens", "2",
                                 "--attention-plot", str(single), "--attention-layer", "5"])
    assert result.exit_code == 2 and "--attention-layer 5" in result.stderr


def test_attention_plot_draws_the_chosen_layer_and_head(tiny, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    model, tokenizer = tiny
    tokens, weights = report.attention_weights(model, tokenizer, tokenizer("昨天天气很")["input_ids"])
    drawn = []
    real_imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda axes, matrix, *args, **kwargs: drawn.append(torch.tensor(matrix))
                        or real_imshow(axes, matrix, *args, **kwargs))
    cases = [((None, None), [weights[0].mean(0), weights[1].mean(0)]),  # every layer, heads averaged
             ((1, None), [weights[1].mean(0)]), ((1, 0), [weights[1, 0]]), ((1, 1), [weights[1, 1]]),
             ((None, 1), [weights[0, 1], weights[1, 1]])]
    for (layer, head), expected in cases:
        drawn.clear()
        report.plot_attention(tokens, weights, tmp_path / "attn.png", layer, head)
        assert len(drawn) == len(expected) and all(torch.equal(a, b) for a, b in zip(drawn, expected)), (layer, head)
    # so that picking a head or a layer shows something else
    assert not torch.allclose(weights[1, 0], weights[1, 1]) and not torch.allclose(weights[0, 1], weights[1, 1])
    with pytest.raises(LlmkitError, match="--attention-head 2: the model has heads 0..1"):
        report.plot_attention(tokens, weights, tmp_path / "attn.png", 0, 2)


def test_attention_weights_are_causal_distributions_of_the_model(tiny, tiny_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    before = model.config._attn_implementation
    assert before != "eager"  # loaded with a fused kernel, which returns no weights
    generation = generate_text(model, tokenizer, "昨天", GREEDY)
    tokens, weights = report.attention_weights(model, tokenizer, generation.ids)
    n = len(generation.ids)
    assert len(tokens) == n and weights.shape == (2, 2, n, n)  # layers x heads x query x key
    # each query's weights are a distribution over the keys up to itself
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, n), atol=1e-5)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert (weights[..., ~causal] == 0).all() and (weights[..., causal] > 0).all()
    # they are the model's own: what transformers' eager attention returns
    eager = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    with torch.no_grad():
        reference = eager(torch.tensor([generation.ids]), output_attentions=True).attentions
    assert torch.allclose(weights, torch.stack([layer[0] for layer in reference]), atol=1e-5)
    # eager attention is only for the plot: the model goes back to its kernel and generates as before
    assert model.config._attn_implementation == before
    assert generate_text(model, tokenizer, "昨天", GREEDY).ids == generation.ids


def test_attention_weights_restore_the_kernel_after_an_error(tiny, monkeypatch):
    model, tokenizer = tiny
    before = model.config._attn_implementation
    assert before != "eager"

    def broken(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(model), "forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        report.attention_weights(model, tokenizer, [0, 5, 6])
    assert model.config._attn_implementation == before


# ---------------------------------------------------------------- beams, several sequences, dtype


def sequence_logprob(model, ids: list[int], prompt_length: int) -> float:
    """log P(ids[prompt_length:] | ids[:prompt_length]) under the model."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(prompt_length, len(ids)))


def test_beam_search_is_transformers_beam_search(tiny):
    model, tokenizer = tiny
    prompt = "昨天天气很"
    beam = generate_text(model, tokenizer, prompt, replace(GREEDY, num_beams=4))
    greedy = generate_text(model, tokenizer, prompt, GREEDY)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, num_beams=4, do_sample=False, max_new_tokens=GREEDY.max_new_tokens)
    assert beam.ids == expected[0].tolist()
    # Beam search found a likelier 8-token continuation than greedy on this model (so beams were used)
    length = inputs["input_ids"].shape[1]
    assert len(beam.ids) == len(greedy.ids) == length + GREEDY.max_new_tokens and beam.text != greedy.text
    assert sequence_logprob(model, beam.ids, length) > sequence_logprob(model, greedy.ids, length)
    assert beam.first_token_seconds is None  # transformers takes no streamer with beams


def test_beam_search_returns_the_best_beams_per_prompt(tiny):
    model, tokenizer = tiny
    settings = replace(GREEDY, num_beams=4, num_return_sequences=3)
    prompts = ["昨天天气很", "今天", "我们的国家"]
    single = [generate_text(model, tokenizer, p, settings) for p in prompts]
    for generation, prompt in zip(single, prompts):
        # 3 different beams, the best first: the one a single-sequence beam search returns
        best = generate_text(model, tokenizer, prompt, replace(settings, num_return_sequences=1))
        assert len(set(generation.texts)) == 3 and generation.text == best.text
    # batched: each prompt gets its own 3 beams, in order
    assert generate_batch(model, tokenizer, prompts, settings, batch_size=2) == [g.texts for g in single]


def test_num_return_sequences_samples_distinct_continuations(tiny):
    model, tokenizer = tiny
    settings = replace(SAMPLE, num_return_sequences=3)
    generation = generate_text(model, tokenizer, "今天", settings, seed=0)
    assert len(generation.texts) == len(set(generation.texts)) == 3 and generation.new_tokens == 3 * 8
    batched = generate_batch(model, tokenizer, ["今天", "我们的国家"], settings, seed=0)
    assert [len(texts) for texts in batched] == [3, 3] and len({t for texts in batched for t in texts}) == 6


def test_cli_num_return_sequences_writes_one_line_each(tiny_dir, tiny):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "今天", "--temperature", "1", "--top-k", "0",
            "--max-new-tokens", "6", "--seed", "5"]
    # the library with the same seed and settings (the CLI's defaults for the rest) gives these 3 texts
    settings = GenerateSettings(temperature=1.0, top_k=0, max_new_tokens=6, num_return_sequences=3)
    texts = generate_text(*tiny, "今天", settings, seed=5).texts
    assert len(set(texts)) == 3
    for flag in ("-n", "--num-return-sequences"):
        result = runner.invoke(app, args + [flag, "3"])
        assert result.exit_code == 0, result.output
        assert result.stdout == "".join(f"今天{text}\n" for text in texts)  # prompt + continuation, one a line


@pytest.mark.parametrize("dtype, expected", [("bfloat16", "bfloat16"), ("float32", "float32"),
                                             ("auto", "float32")])  # auto: fp32 on the CPU
def test_dtype_loads_the_parameters_in_it(tiny_dir, dtype, expected):
    model, tokenizer = loading.load_model(str(tiny_dir), device="cpu", dtype=dtype)
    assert {parameter.dtype for parameter in model.parameters()} == {getattr(torch, expected)}
    assert generate_text(model, tokenizer, "今天", GREEDY).new_tokens == GREEDY.max_new_tokens


def test_cli_dtype_reaches_the_model(tiny_dir, monkeypatch):
    loaded = []
    real_load = generate.load_generator

    def load_and_keep(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(generate, "load_generator", load_and_keep)
    for dtype in ("bfloat16", "float32"):
        result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "今天", "--greedy",
                                     "--max-new-tokens", "4", "--dtype", dtype])
        assert result.exit_code == 0, result.output
        model, tokenizer = loaded[-1]
        assert {parameter.dtype for parameter in model.parameters()} == {getattr(torch, dtype)}
        expected = generate_text(model, tokenizer, "今天", replace(GREEDY, max_new_tokens=4)).text
        assert result.stdout == "今天" + expected + "\n"


def test_generation_starts_from_the_models_generation_config_and_what_is_set_wins(tiny_dir, tmp_path):
    """A model made elsewhere brings its sampling settings and end ids (a list, as chat models have);
    llmkit's own models set none, so llmkit's defaults hold for them; a recipe or flag overrides either."""
    import shutil

    from transformers import GenerationConfig

    from llmkit.generation import DEFAULT_SAMPLING, generation_kwargs

    def sampling(kwargs):
        return {key: kwargs[key] for key in DEFAULT_SAMPLING}

    model, tokenizer = loading.load_model(str(tiny_dir))
    assert sampling(generation_kwargs(GenerateSettings(), tokenizer, model)) == DEFAULT_SAMPLING
    first = generate_text(model, tokenizer, "今天", replace(GREEDY, max_new_tokens=1)).ids[-1]
    assert first != tokenizer.eos_token_id

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_dir, elsewhere)
    config = GenerationConfig.from_model_config(model.config)
    config.update(do_sample=True, temperature=0.3, top_k=7, repetition_penalty=1.0,
                  eos_token_id=[tokenizer.eos_token_id, first])
    config.save_pretrained(elsewhere)
    model, tokenizer = loading.load_model(str(elsewhere))
    kwargs = generation_kwargs(GenerateSettings(), tokenizer, model)
    assert sampling(kwargs) == {"temperature": 0.3, "top_k": 7, "top_p": 0.95, "repetition_penalty": 1.0}
    assert kwargs["eos_token_id"] == [tokenizer.eos_token_id, first]
    chosen = generation_kwargs(GenerateSettings(temperature=1.2, top_k=0), tokenizer, model)
    assert sampling(chosen) == {"temperature": 1.2, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.0}
    stopped = generate_text(model, tokenizer, "今天", GREEDY)  # its first token is one of the model's end ids
    assert stopped.new_tokens == 1 < GREEDY.max_new_tokens
