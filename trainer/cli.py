"""qtrain: fine-tune LoRA adapters against a frozen 4-bit checkpoint."""
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-kit")
def main():
    """Fine-tune LoRA adapters against a frozen NF4 checkpoint (QLoRA)."""


@main.command()
def train():
    """Train one LoRA adapter (not implemented yet)."""
    click.echo("qtrain train: not implemented yet", err=True)
    sys.exit(1)


@main.command("train-many")
def train_many():
    """Train many per-customer adapters in one run (not implemented yet)."""
    click.echo("qtrain train-many: not implemented yet", err=True)
    sys.exit(1)
