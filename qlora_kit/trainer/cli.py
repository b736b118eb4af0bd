"""qtrain: fine-tune LoRA adapters against a frozen 4-bit checkpoint.

`train`'s options are generated from TrainConfig's fields (trainer/config.py), so defaults and help
live in one place; a flag only overrides when given. Errors go through qlora_kit._cli.cli_errors.
"""
import sys

import click
from rich.console import Console

from qlora_kit._cli import cli_errors, dataclass_options

from . import plot
from .ask import ask as run_ask
from .config import TrainConfig, build_config
from .distributed import from_env
from .loop import train as run_train
from .many.cli import train_many
from .merge.cli import merge

PRESET = """\b
Defaults are the QLoRA paper's recipe (Dettmers et al. 2023):
  r 64, lora_alpha 16, lora_dropout 0.1, all linear layers (--target-modules all-linear),
  lr 2e-4, constant schedule, warmup 3%, max_grad_norm 0.3, paged AdamW (32-bit states),
  effective batch 16 (--batch-size 4 x --grad-accum 4), gradient checkpointing, bf16 compute.
Settings also come from --config FILE (.toml/.yaml/.json, keys = option names); flags override the file.
\b
Writes OUT/: adapter_config.json + adapter_model.safetensors (PEFT layout), train_config.json,
metrics.jsonl, loss_curve.png (with matplotlib: the `plot` extra), runs/ (--report-to tensorboard),
checkpoints/step-N/ (--save-every). Ctrl-C saves a checkpoint; continue with --resume OUT.
Push the adapter to the Hub with its own model card: qtrain publish OUT REPO_ID."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-kit")
def main():
    """Fine-tune LoRA adapters against a frozen NF4 checkpoint (QLoRA)."""


@cli_errors
def _train(config, **flags):
    cfg = build_config(config, **flags)
    console = Console(stderr=True)
    result = run_train(cfg, console=console)  # under torchrun: data parallel (trainer/distributed.py)
    if not from_env().is_main:
        return
    if result.interrupted:
        console.print(f"checkpoint {result.checkpoint}: continue with  qtrain train --config ... --resume {result.out}")
        sys.exit(130)
    tail = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    first = f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else "no steps run"
    Console().print(f"wrote {result.out}: {result.steps} steps, {first}{tail}, {result.tokens_per_s:,.0f} tok/s, "
                    f"peak memory {result.peak_memory_mb:,.0f} MiB")
    if not plot.HAS_MATPLOTLIB:
        console.print(plot.SKIPPED, markup=False, highlight=False, soft_wrap=True)


train = click.Command(
    "train", callback=_train, help="Train one LoRA adapter on --data against --base, writing --out.\n\n" + PRESET,
    params=[click.Option(["--config"], type=click.Path(dir_okay=False), default=None,
                         help="TOML/YAML/JSON file of settings (keys are the option names)")]
    + dataclass_options(TrainConfig),
    context_settings={"max_content_width": 110})
main.add_command(train)


@main.command()
@click.option("--base", required=True, help="the checkpoint the adapter was trained on (folder or Hub id)")
@click.option("--adapter", required=True, help="adapter folder (qtrain train's --out, or any PEFT LoRA adapter)")
@click.option("--max-tokens", default=48, show_default=True)
@click.argument("questions", nargs=-1, required=True)
@cli_errors
def ask(base, adapter, max_tokens, questions):
    """Answer QUESTIONS greedily with the base model and with the adapter, side by side."""
    console = Console()
    for a in run_ask(base, adapter, list(questions), max_tokens):
        console.print(f"[bold]Q:[/bold] {a.question}", highlight=False)
        console.print(f"  [dim]base   :[/dim] {a.base}", highlight=False)
        console.print(f"  [green]adapter:[/green] {a.adapter}", highlight=False)


main.add_command(train_many)  # trainer/many/cli.py


@main.command()
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--base-model", default=None, help="Hub id of the base (default: the adapter's base_model_name_or_path "
              "when it is a Hub id).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing).")
@click.option("--dry-run", is_flag=True, help="Print the files and model card that would be uploaded; upload nothing.")
@click.option("--token", envvar="HF_TOKEN", default=None, help="Hub token (default: $HF_TOKEN or the saved login).")
@cli_errors
def publish(adapter_dir, repo_id, base_model, private, revision, dry_run, token):
    """Push the adapter in ADAPTER_DIR (qtrain train's --out) to REPO_ID with its own model card: base model link,
    data summary, training settings, losses, eval loss and the loss curve."""
    from .publish import plan, upload

    p = plan(adapter_dir, repo_id, revision, private, base_model)
    if dry_run:
        click.echo(f"would upload to {repo_id} (revision {revision or 'main'}, {'private' if private else 'public'}):")
        for name, size in p.files:
            click.echo(f"  {name}\t{size}")
        click.echo("--- README.md ---\n" + p.card)
        return
    Console().print(f"uploaded {len(p.files)} files: {upload(adapter_dir, p, token)}")
main.add_command(merge)  # trainer/merge/cli.py
