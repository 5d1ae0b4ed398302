"""What reaches the terminal: results on stdout, what scripts read (tables, the final line of a command);
everything else on stderr (progress, notes, warnings, errors); colours and live displays only on a
terminal; and the libraries' own chatter kept off both."""

import logging
import os
import sys
import warnings

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)  # progress, notes, warnings, errors
stdout = Console(highlight=False, soft_wrap=True)  # results, what scripts read


class _DropOptionalKernelNotice(logging.Filter):
    """bitsandbytes (imported by peft, so by every Trainer) logs at import, on CPUs with avx512_bf16, that an
    optional kernel package is missing; its own CPU path works without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def quiet_optional_kernel_notice() -> None:
    """Drop that notice only; its other warnings still show. Set up when llmkit is imported, before anything
    imports bitsandbytes."""
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropOptionalKernelNotice) for f in bnb_cpu.filters):
        bnb_cpu.addFilter(_DropOptionalKernelNotice())


def quiet_libraries() -> None:
    """Libraries' progress bars and info logs off: llmkit shows its own progress. Called by every command."""
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft 0.21
    transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when datasets is imported: commands that never use it do not pay its import (0.4 s)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
