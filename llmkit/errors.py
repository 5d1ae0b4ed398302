"""The one error type that the CLI shows as a single line with exit status 2."""


class LlmkitError(Exception):
    """Bad input or usage: a recipe, a file, a key or a value that cannot be used as given.

    The message names what was wrong (file, key, line) and what was expected; the CLI prints it as
    one line and exits with status 2, with a traceback only under --debug.
    """


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving a resumable checkpoint."""
