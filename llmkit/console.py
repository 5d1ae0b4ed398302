"""The one rich console everything prints through: colours and live displays only on a terminal."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
error_console = Console(stderr=True, highlight=False, soft_wrap=True)
