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


class _Drop(logging.Filter):
    """Drops a library's log records that contain `text`; its other records still show."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# (logger, notice): bitsandbytes (imported by peft, so by every Trainer) logs at import, on CPUs with
# avx512_bf16, that an optional kernel package is missing, and its own CPU path works without it; DeepSpeed
# logs, on stdout, that it found no GPU whenever a run on CPUs imports it, and runs on the CPU as asked.
NOTICES = (("bitsandbytes.backends.cpu.ops", "kernels-community"), ("DeepSpeed", "Setting accelerator to CPU"))


def quiet_import_notices() -> None:
    """Drop those notices only. Set up when llmkit is imported, before anything imports the libraries."""
    for name, text in NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
            logger.addFilter(_Drop(text))


def quiet_libraries() -> None:
    """Libraries' progress bars and info logs off: llmkit shows its own progress. Called by every command."""
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft 0.21
    transformers.logging.disable_progress_bar()
    # DeepSpeed's ZeRO gathers and scatters with torch functions that torch 2.13 deprecates: their warnings,
    # at every step.
    warnings.filterwarnings("ignore", message="`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            "is deprecated", category=FutureWarning)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when datasets is imported: commands that never use it do not pay its import (0.4 s)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
