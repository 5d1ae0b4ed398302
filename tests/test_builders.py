import pytest
import torch

from llmkit.builders import build_model, model_config, training_arguments, training_precision
from llmkit.errors import LlmkitError
from llmkit.recipe import load_recipe
from llmkit.settings import ModelSettings, TokenizerSettings
from llmkit.tokenizer import train_tokenizer

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


def test_gradient_checkpointing_is_passed_on(tmp_path):
    assert arguments(tmp_path, "train.gradient_checkpointing=true").gradient_checkpointing is True
