"""Where a model runs and in what precision: one rule for every command, training and inference. What
`auto` means on this machine is decided from what torch reports at run time, and said with its reason.

- Device: a CUDA GPU, else an Apple GPU (mps), else the CPU.

- GPUs: bf16 where the GPU computes in it, else fp16 (training: mixed precision; inference: weights).
- Apple GPUs (mps): fp16 for inference, fp32 for training.
- CPUs, training: bf16 mixed precision where the CPU computes in bf16 natively (AMX or avx512_bf16, as
  `torch.cpu.get_capabilities()` reports), fp32 elsewhere (on AVX2-only CPUs bf16 is emulated, ~100x
  slower). Measured (bench/pretrain_throughput.py, README): a bf16 matmul runs ~2x fp32 on both kinds, the
  quickstart model trains faster, and its loss per char after the same steps is the same. The features
  decide, not a timing at start-up: on a busy machine a timing can flip from run to run (measured here:
  4.3x, then 0.38x minutes later), and a run, its resume and every rank of a distributed run must agree.
- CPUs, inference: fp32. Generation at batch 1 is bound by memory bandwidth, not arithmetic: bf16 ran no
  faster on an AMX CPU (89M Llama: 30 vs 34 tokens/s), and fp32 keeps outputs those of the trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError

NATIVE_BF16 = ("amx_bf16", "avx512_bf16")  # torch.cpu.get_capabilities() keys of CPUs that compute in bf16
NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # recipe names -> torch dtype names


def pick_device(device: str = "auto") -> str:
    """`device` ("auto", "cuda", "mps", "cpu") as a torch device name, refused where it is absent."""
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (device == "cuda" and not cuda) or (device == "mps" and not mps):
        raise LlmkitError(f"--device {device}: not available on this machine")
    return device


def has_accelerator() -> bool:
    return pick_device() != "cpu"


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16" or "fp16"
    reason: str

    @property
    def dtype(self):
        import torch

        return getattr(torch, NAMES[self.name])


def choose(asked: str, device: str, training: bool) -> Precision:
    """The precision for `device` ("cpu", "cuda", "cuda:1", "mps"): `asked` ("auto", "fp32", "bf16",
    "fp16", or a torch dtype name such as "bfloat16") unless it is "auto"."""
    if asked != "auto":
        name = {value: key for key, value in NAMES.items()}.get(asked, asked)
        return Precision(name, "asked for")
    if device.startswith("cuda"):
        return gpu_precision()
    if device == "mps":
        return Precision("fp32", "training on Apple GPUs stays in fp32") if training else Precision("fp16", "Apple GPU")
    return cpu_training_precision() if training else Precision(
        "fp32", "CPU inference: bound by memory bandwidth, bf16 is no faster and would change the outputs")


def training_precision(asked: str) -> Precision:
    """The precision to train in on this machine's default device."""
    return choose(asked, pick_device(), training=True)


def inference_dtype(dtype: str, device: str):
    """The torch dtype to load a model in for inference: `dtype`, or for "auto" the rule above."""
    return choose(dtype, device, training=False).dtype


def gpu_precision() -> Precision:
    import torch

    if torch.cuda.is_bf16_supported():
        return Precision("bf16", "the GPU computes in bf16")
    return Precision("fp16", "the GPU has no bf16")


def cpu_training_precision() -> Precision:
    native = cpu_bf16_features()
    if not native:
        return Precision("fp32", "this CPU has no native bf16 (no AMX, no avx512_bf16): bf16 would be emulated")
    return Precision("bf16", f"this CPU computes in bf16 natively ({' and '.join(native)})")


def cpu_bf16_features() -> list[str]:
    """The native bf16 features torch reports for this CPU (empty on AVX2-only CPUs and on torch builds
    without `torch.cpu.get_capabilities`)."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return [name for name in NATIVE_BF16 if capabilities.get(name)]
