"""The device and precision rule (llmkit.devices), with the CPU's capabilities and the GPUs mocked: the
same assertions hold on every machine, whatever its CPU."""

import pytest
import torch

from llmkit import devices
from llmkit.devices import Precision, choose

AVX2 = {"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_tile": False, "amx_bf16": False}
AVX512_BF16 = AVX2 | {"avx512_f": True, "avx512_bf16": True}
AMX = AVX512_BF16 | {"amx_tile": True, "amx_bf16": True}


@pytest.fixture
def cpu(monkeypatch):
    """cpu(capabilities): this process sees a CPU with those capabilities."""

    def set_cpu(capabilities: dict) -> None:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)

    return set_cpu


def test_avx2_only_cpu_trains_in_fp32(cpu):
    cpu(AVX2)
    chosen = choose("auto", "cpu", training=True)
    assert chosen.name == "fp32" and "no native bf16" in chosen.reason


@pytest.mark.parametrize("capabilities, features", [(AVX512_BF16, "avx512_bf16"), (AMX, "amx_bf16 and avx512_bf16")])
def test_native_bf16_cpu_trains_in_bf16_and_says_why(cpu, capabilities, features):
    cpu(capabilities)
    chosen = choose("auto", "cpu", training=True)
    assert chosen == Precision("bf16", f"this CPU computes in bf16 natively ({features})")
    assert chosen.dtype is torch.bfloat16


@pytest.mark.parametrize("capabilities", [AVX2, AVX512_BF16, AMX])
def test_cpu_inference_is_fp32_on_every_cpu(cpu, capabilities):
    cpu(capabilities)
    assert choose("auto", "cpu", training=False).dtype is torch.float32


@pytest.mark.parametrize("asked, name", [("bf16", "bf16"), ("fp32", "fp32"), ("fp16", "fp16"),
                                         ("bfloat16", "bf16"), ("float32", "fp32"), ("float16", "fp16")])
def test_an_explicit_precision_is_kept_on_any_cpu(cpu, asked, name):
    cpu(AVX2)
    for training in (True, False):
        assert choose(asked, "cpu", training=training) == Precision(name, "asked for")


@pytest.mark.parametrize("bf16_gpu, name", [(True, "bf16"), (False, "fp16")])
def test_gpus_use_bf16_where_they_have_it_else_fp16(monkeypatch, bf16_gpu, name):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_gpu)
    assert choose("auto", "cuda", training=True).name == name
    assert choose("auto", "cuda:0", training=False).name == name


def test_torch_without_get_capabilities_means_no_native_bf16(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert devices.cpu_bf16_features() == []


def test_training_arguments_follow_the_rule(cpu, tmp_path, monkeypatch):
    from llmkit.training import training_arguments
    from llmkit.recipe import load_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    settings = load_recipe(None, [])
    for capabilities, bf16 in ((AVX2, False), (AVX512_BF16, True), (AMX, True)):
        cpu(capabilities)
        args = training_arguments(settings.train, settings.distributed, 0, tmp_path)
        assert (args.bf16, args.fp16) == (bf16, False)


def test_auto_device_is_the_first_accelerator_present_and_an_absent_one_is_refused(monkeypatch):
    from llmkit.errors import LlmkitError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.pick_device() == "mps" and devices.has_accelerator()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.pick_device("auto") == "cpu" and not devices.has_accelerator()
    with pytest.raises(LlmkitError, match=r"^--device cuda: not available on this machine$"):
        devices.pick_device("cuda")
