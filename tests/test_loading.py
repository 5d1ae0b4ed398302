"""Finding, loading and building models (llmkit.loading): a local-looking name that is not there is an
error, never a hub download attempt; configs and models built from a recipe have the size and head asked for."""

from pathlib import Path

import pytest

from llmkit.errors import LlmkitError
from llmkit.loading import build_model, model_config, resolve_model
from llmkit.recipe import load_recipe, looks_local
from llmkit.settings import ModelSettings, TokenizerSettings
from llmkit.tokenizer import train_tokenizer


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with a runs/ folder in it, and a home of its own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "runs").mkdir()
    return tmp_path


@pytest.mark.parametrize("name", ["runs/nothing", "./nothing", "../nothing", "/nothing/at/all", "~/nothing",
                                  "a/b/c", "owner/..", "owner/", "/owner"])
def test_a_local_looking_model_that_is_not_there_is_refused(workdir, name):
    with pytest.raises(LlmkitError, match=rf"^model not found: {name} \(no such folder\)$"):
        resolve_model(name)


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B", "gpt2", "nothing/here"])
def test_hub_ids_are_kept(workdir, name):
    assert resolve_model(name) == name


def test_runs_slash_name_is_a_hub_id_only_while_no_runs_folder_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("runs/x")
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/x")


def test_an_existing_model_folder_is_returned_and_one_without_a_config_refused(workdir):
    (workdir / "runs" / "model").mkdir()
    with pytest.raises(LlmkitError, match=r"runs/model: not a model \(no config.json"):
        resolve_model("runs/model")
    (workdir / "runs" / "model" / "config.json").write_text("{}", encoding="utf-8")
    assert resolve_model("runs/model") == "runs/model"


def test_finetune_with_a_missing_model_path_stops_before_the_hub_and_the_disk(workdir, monkeypatch):
    """model.path goes through resolve_model: refused before any download attempt or run folder."""
    import json

    import huggingface_hub

    from llmkit import finetune
    from llmkit.recipe import load_recipe

    def no_hub(*args, **kwargs):
        raise AssertionError("tried the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    rows = [{"text": f"review {i}", "label": ["good", "bad"][i % 2]} for i in range(20)]
    (workdir / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    recipe = load_recipe("classify", ["model.path=runs/pretrain-zh-tiny", f"finetune.source={workdir / 'rows.jsonl'}",
                                      'finetune.test_source=""'])
    with pytest.raises(LlmkitError, match=r"^model not found: runs/pretrain-zh-tiny \(no such folder\)$"):
        finetune.run(recipe)
    assert not (workdir / "runs" / "classify").exists()


SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_positions=64", "data.block_size=32"]
TEXTS = ["昨天天气很好", "今天下雨了", "明天会更好"]


@pytest.fixture(scope="module")
def causal():
    return train_tokenizer(TEXTS, TokenizerSettings(vocab_size=100), "causal")


@pytest.fixture(scope="module")
def mlm():
    return train_tokenizer(TEXTS, TokenizerSettings(vocab_size=100), "mlm")


def recipe(*overrides):
    return load_recipe(None, SMALL + list(overrides))


# model_config


@pytest.mark.parametrize("arch, objective", [("llama", "causal"), ("gpt2", "causal"), ("bert", "mlm")])
def test_config_has_the_requested_size_and_vocab(arch, objective, causal, mlm):
    tokenizer = causal if objective == "causal" else mlm
    settings = ModelSettings(arch=arch, n_layer=3, d_model=48, n_head=4, max_positions=96)
    config = model_config(settings, tokenizer, objective)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (3, 48, 4)
    assert config.max_position_embeddings == 96
    assert config.vocab_size == len(tokenizer) and config.pad_token_id == tokenizer.pad_token_id


def test_causal_config_knows_bos_and_eos(causal):
    config = model_config(ModelSettings(), causal, "causal")
    assert (config.bos_token_id, config.eos_token_id) == (causal.bos_token_id, causal.eos_token_id)


@pytest.mark.parametrize("d_model", [64, 256, 384, 512, 768])
def test_llama_d_ff_default_is_a_multiple_of_64_near_8_thirds(d_model, causal):
    d_ff = model_config(ModelSettings(d_model=d_model), causal, "causal").intermediate_size
    assert d_ff % 64 == 0 and abs(d_ff - 8 * d_model / 3) <= 32


def test_explicit_d_ff_and_kv_heads_are_kept(causal):
    config = model_config(ModelSettings(d_model=64, n_head=4, n_kv_head=2, d_ff=100), causal, "causal")
    assert config.intermediate_size == 100 and config.num_key_value_heads == 2


def test_kv_heads_default_to_heads(causal):
    assert model_config(ModelSettings(n_head=4), causal, "causal").num_key_value_heads == 4


def test_gpt2_and_bert_d_ff_default_to_four_times_d_model(causal, mlm):
    assert model_config(ModelSettings(arch="gpt2", d_model=32), causal, "causal").n_inner == 128
    assert model_config(ModelSettings(arch="bert", d_model=32), mlm, "mlm").intermediate_size == 128


def test_bert_for_a_causal_objective_is_refused(causal):
    with pytest.raises(LlmkitError, match='model.arch = "bert" needs train.objective = "mlm"'):
        model_config(ModelSettings(arch="bert"), causal, "causal")


# build_model


@pytest.mark.parametrize("overrides, name", [
    ([], "LlamaForCausalLM"),
    (["model.arch=gpt2"], "GPT2LMHeadModel"),
    (["model.arch=bert", "train.objective=mlm"], "BertForMaskedLM"),
])
def test_build_model_from_scratch_picks_the_auto_class(overrides, name, causal, mlm):
    tokenizer = mlm if "train.objective=mlm" in overrides else causal
    model = build_model(recipe(*overrides), tokenizer)
    assert type(model).__name__ == name
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32


@pytest.mark.parametrize("tie", [True, False])
def test_tie_embeddings_shares_input_and_output_weights(tie, causal):
    model = build_model(recipe(f"model.tie_embeddings={str(tie).lower()}"), causal)
    shared = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert shared is tie


@pytest.fixture
def saved_model(tmp_path, causal):
    path = tmp_path / "model"
    build_model(recipe(), causal).save_pretrained(path)
    return path


def test_model_path_continues_from_the_saved_model(saved_model, causal):
    model = build_model(recipe(f"model.path={saved_model}", "model.n_layer=4"), causal)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 1


def test_model_path_with_a_larger_tokenizer_grows_the_embeddings(saved_model):
    bigger = train_tokenizer(TEXTS + ["完全不同的新字符集合"], TokenizerSettings(vocab_size=100), "causal")
    model = build_model(recipe(f"model.path={saved_model}"), bigger)
    assert model.get_input_embeddings().num_embeddings == len(bigger)


def test_block_size_beyond_the_loaded_models_positions_is_refused(saved_model, causal):
    with pytest.raises(LlmkitError, match=r"data\.block_size \(128\) is larger than the model's positions \(llama: 64\)"):
        build_model(recipe(f"model.path={saved_model}", "data.block_size=128"), causal)


def test_model_path_without_a_model_is_refused(tmp_path, causal):
    with pytest.raises(LlmkitError, match=f"model.path {tmp_path}: not a model"):
        build_model(recipe(f"model.path={tmp_path}"), causal)


def test_the_default_model_is_the_newest_one_with_the_head_the_command_uses(workdir):
    from llmkit.rundir import make_owned, point_latest

    for name in ("lm", "classifier"):
        make_owned(workdir / "runs" / name, "run")
        (workdir / "runs" / name / "config.json").write_text("{}")
    point_latest(workdir / "runs" / "lm")
    point_latest(workdir / "runs" / "classifier", "sequence-classification")  # after the LM: it must not hijack it
    assert Path(resolve_model(None, "runs")).resolve() == (workdir / "runs" / "lm").resolve()
    assert Path(resolve_model(None, "runs", "sequence-classification")).resolve() == (workdir / "runs" / "classifier").resolve()
    with pytest.raises(LlmkitError, match=r"^no trained question-answering model found in runs/ \(no runs/latest-question-answering\); "
                                          r"train one or pass --model$"):
        resolve_model(None, "runs", "question-answering")

