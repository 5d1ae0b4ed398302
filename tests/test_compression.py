"""Which layers bitsandbytes' 4-bit kernels take (llmkit.compression); pruning and dynamic int8 are tested
end to end by tests/test_quantize.py: the rule holds on every machine, whatever
its CPU, so a recipe gives the same model everywhere."""

import pytest
import transformers

from llmkit.compression import fits_four_bit, four_bit_config, four_bit_misfits


@pytest.mark.parametrize("in_features, out_features, fits", [
    (64, 32, True), (128, 128, True), (384, 128, True),
    (32, 128, False),  # narrower than one 64-wide block: `shape '[128, 0]' is invalid` on avx512_bf16 CPUs
    (96, 32, False),   # not a whole number of blocks
    (64, 48, False),   # rows not a multiple of the packed CPU kernel's 32
])
def test_a_layer_fits_whole_blocks_only(in_features, out_features, fits):
    assert fits_four_bit(in_features, out_features) is fits


@pytest.fixture
def narrow_llama(tmp_path):
    """hidden 32, MLP 64: every projection but down_proj (64 -> 32) is too narrow for 4-bit."""
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    return tmp_path


def test_misfits_are_named_relative_to_the_backbone(narrow_llama):
    model = transformers.LlamaForCausalLM.from_pretrained(narrow_llama)
    misfits = four_bit_misfits(model)
    expected = [f"layers.{i}.{part}" for i in range(2) for part in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj")]
    assert sorted(misfits) == sorted(expected)
    assert four_bit_misfits(transformers.AutoModel.from_pretrained(narrow_llama)) == misfits  # backbone alone


def test_the_config_keeps_misfits_and_the_output_layer_unquantized(narrow_llama):
    config = four_bit_config(str(narrow_llama), transformers.AutoModelForCausalLM, quant_type="fp4",
                             double_quant=False, skip=("score",))
    kept = set(config.llm_int8_skip_modules)
    assert {"lm_head", "score", "layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"} <= kept
    assert not any("down_proj" in name for name in kept)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4" and not config.bnb_4bit_use_double_quant
