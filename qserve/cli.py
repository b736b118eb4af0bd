"""qserve: one 4-bit base, many hot-swappable LoRA adapters, OpenAI-compatible HTTP API."""
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-kit")
def main():
    """Serve a 4-bit base with many LoRA adapters behind an OpenAI-compatible API."""


@main.command()
def serve():
    """Start the HTTP server (not implemented yet)."""
    click.echo("qserve serve: not implemented yet", err=True)
    sys.exit(1)
