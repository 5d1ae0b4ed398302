"""The two exceptions the CLI turns into exit statuses, and the helpers that word error messages.

Every expected failure is an LlmkitError: one line on stderr, exit status 2, a traceback only under
--debug. Interrupted is a training run stopped by Ctrl-C or SIGTERM after saving a checkpoint (exit 130).
"""

from __future__ import annotations

import difflib
from typing import Iterable


class LlmkitError(Exception):
    """Bad input or usage: a recipe, a file, a key or a value that cannot be used as given.

    The message names what was wrong (file, key, line) and what was expected; the CLI prints it as
    one line and exits with status 2, with a traceback only under --debug.
    """


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM after saving a resumable checkpoint."""


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """` (did you mean 'x'?)` for the choice closest to a misspelled name, or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def first_line(error: Exception) -> str:
    """The first line of a library's error message (they run to pages), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
