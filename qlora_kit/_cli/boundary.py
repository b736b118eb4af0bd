"""The CLIs' one error boundary: a QloraKitError (bad input) becomes one red line and exit code 2,
any other failure exit code 1, Ctrl-C exit code 130 and SIGTERM exit code 143. Shared by qconvert, qtrain
and qserve (it lives above formats/, which imports only torch and safetensors).

SIGTERM is handled like Ctrl-C (KeyboardInterrupt) while a command runs, so the same cleanup runs: atomic
writes remove their temporary folders (formats.io.atomic_dir) instead of leaving them behind.
"""
import functools
import signal
import sys
import threading

import click
from rich.console import Console
from rich.markup import escape

from qlora_kit.formats.errors import QloraKitError

err_console = Console(stderr=True, highlight=False)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every cleanup path runs."""


def _on_sigterm(signum, frame):
    raise Terminated("terminated (SIGTERM): no output was left behind")


def cli_errors(fn):
    """Decorate a click command so user errors print as one line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except (QloraKitError, FileExistsError, FileNotFoundError) as e:
            err_console.print(f"[red]error:[/red] {_escape(e)}", soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt as e:  # the message says what was left behind (loops that keep output say so)
            err_console.print(f"[red]interrupted[/red]: {_escape(e.args[0] if e.args else 'no output was left behind')}",
                              soft_wrap=True)
            sys.exit(143 if isinstance(e, Terminated) else 130)
        except click.exceptions.Exit:
            raise
        except OSError as e:
            err_console.print(f"[red]failed:[/red] {_escape(e)}", soft_wrap=True)
            sys.exit(1)
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    return wrapper


def _escape(value) -> str:
    """User text printed as is: a path or key such as `[x]` is not rich markup."""
    return escape(str(value))
