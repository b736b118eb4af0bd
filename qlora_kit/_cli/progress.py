"""The rich progress bar qconvert convert/dequantize and qtrain merge show while streaming tensors, in bytes read."""
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


def byte_progress(enabled: bool = True) -> Progress:
    """A transient bar (description, bar, bytes done/total, speed, ETA) on stderr."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True)
