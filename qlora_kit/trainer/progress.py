"""Live progress (rich): a bar with loss, lr, tokens/s and memory; plain lines when not on a terminal."""
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StepProgress:
    """Shows one line per update on a terminal bar, or every ~10% of the run in logs."""

    def __init__(self, total: int, start: int, enabled: bool, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.total, self.enabled = total, enabled
        self.live = enabled and self.console.is_terminal
        self._bar = None
        if self.live:
            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.description}"), console=self.console, transient=False)
            self._task = self._bar.add_task("", total=total, completed=start)
            self._bar.start()

    def update(self, step: int, loss: float, lr: float, tok_s: float, mem_mb: float) -> None:
        text = f"loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s  mem {mem_mb:,.0f} MiB"
        if self.live:
            self._bar.update(self._task, completed=step, description=text)
        elif self.enabled and (step % max(1, self.total // 10) == 0 or step == self.total):
            self.console.print(f"step {step}/{self.total}  {text}", highlight=False)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
