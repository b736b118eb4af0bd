"""The CLIs' one error boundary: a QloraKitError (bad input) becomes one red line and exit code 2,
any other failure exit code 1, Ctrl-C exit code 130. Shared by qconvert, qtrain and qserve."""
import functools
import sys

import click
from rich.console import Console

from .errors import QloraKitError

err_console = Console(stderr=True, highlight=False)


def cli_errors(fn):
    """Decorate a click command so user errors print as one line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (QloraKitError, FileExistsError, FileNotFoundError) as e:
            err_console.print(f"[red]error:[/red] {e}", soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red]: no output was left behind")
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except OSError as e:
            err_console.print(f"[red]failed:[/red] {e}", soft_wrap=True)
            sys.exit(1)

    return wrapper
