"""The run's summary: OUT/summary.json (one row per job) and the same table printed with rich."""
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qlora_kit.formats import write_json

SUMMARY_NAME = "summary.json"
STYLE = {"done": "green", "early_stopped": "green", "stopped": "yellow", "failed": "red"}


def write_summary(out: Path, rows: list[dict], run: dict) -> Path:
    path = Path(out) / SUMMARY_NAME
    write_json(path, {"run": run, "jobs": rows})
    return path


def _num(v, fmt=".4f") -> str:
    return "-" if v is None else format(v, fmt)


def render(rows: list[dict], console: Console | None = None) -> None:
    table = Table(title="train-many", show_lines=False)
    for col in ("job", "status", "steps", "loss first -> last", "eval loss", "tokens", "note"):
        table.add_column(col, justify="right" if col in ("steps", "tokens") else "left")
    for r in rows:
        color = STYLE.get(r["status"], "white")
        table.add_row(r["job"], f"[{color}]{r['status']}[/{color}]", f"{r['steps']}/{r['total_steps']}",
                      f"{_num(r['first_loss'])} -> {_num(r['last_loss'])}", _num(r["eval_loss"]),
                      f"{r['tokens']:,}", r["error"] or "")
    (console or Console()).print(table)
