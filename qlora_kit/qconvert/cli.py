"""qconvert: turn Hugging Face checkpoints into NF4 double-quantized checkpoints (FORMAT.md).

Each command parses its options, calls one library function and prints; errors go through
qlora_kit._cli.cli_errors (one red line; exit 2 bad input, 1 failure, 130 Ctrl-C). Command modules are
imported inside the commands, so `convert` never pays for Triton (kernels/) or the Hub client.
"""
import click
from rich.console import Console

from qlora_kit._cli import cli_errors
from qlora_kit._cli.options import parse_size
from qlora_kit.formats import spec

from .errors import VerifyFailed
from .options import DEFAULT_MIN_SQNR_DB, ConvertConfig

console = Console(soft_wrap=True)
_DEFAULTS = ConvertConfig()
_DTYPES = click.Choice(sorted(spec.NAME_DTYPES))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-kit")
def main():
    """Convert, inspect, verify, dequantize and publish 4-bit NF4 checkpoints."""


@main.command()
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--quant-type", type=click.Choice(spec.QUANT_TYPES), default=_DEFAULTS.quant_type, show_default=True)
@click.option("--blocksize", type=click.Choice([str(b) for b in spec.BLOCKSIZES]), default=str(_DEFAULTS.blocksize),
              show_default=True)
@click.option("--double-quant/--no-double-quant", default=_DEFAULTS.double_quant, show_default=True)
@click.option("--compute-dtype", type=_DTYPES, default=_DEFAULTS.compute_dtype, show_default=True)
@click.option("--skip-modules", multiple=True, help="Module names kept unquantized, e.g. mlp.down_proj (repeatable, "
              "or comma-separated). Embeddings, lm_head and norms are never quantized.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=_DEFAULTS.device, show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--threads", type=int, default=_DEFAULTS.threads, show_default=True, help="CPU threads for quantizing.")
@click.option("--revision", default=None, help="Hub revision of SRC.")
@click.option("--token", envvar="HF_TOKEN", default=None, help="Hub token (default: $HF_TOKEN or the saved login).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@cli_errors
def convert(src, out, quant_type, blocksize, double_quant, compute_dtype, skip_modules, device, max_shard_size,
            overwrite, threads, revision, token, quiet):
    """Quantize SRC (a local HF folder or a Hub repo id) into the 4-bit checkpoint folder OUT."""
    from .convert import convert as run_convert

    skips = tuple(s.strip() for item in skip_modules for s in item.split(",") if s.strip())
    cfg = ConvertConfig(quant_type, int(blocksize), double_quant, compute_dtype, skips, device,
                        parse_size(max_shard_size), overwrite, threads)
    r = run_convert(src, out, cfg, revision=revision, token=token, progress=not quiet)
    console.print(f"wrote {r.out}: {r.quantized} quantized + {r.kept} kept tensors, {r.bytes_in / 2**20:.1f} MiB -> "
                  f"{r.bytes_out / 2**20:.1f} MiB in {len(r.files)} file(s)")


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json_", is_flag=True, help="Print JSON instead of a table.")
@cli_errors
def inspect_(path, as_json_):
    """List PATH's tensors: stored type, bits per parameter, sizes, quantization settings, totals vs bf16."""
    from . import render
    from .inspection import as_json as inspection_json
    from .inspection import inspect_checkpoint

    ins = inspect_checkpoint(path)
    click.echo(inspection_json(ins)) if as_json_ else render.inspection(console, ins)


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--against", default=None, help="Source checkpoint (folder or Hub id) to measure SQNR against.")
@click.option("--min-sqnr", type=float, default=DEFAULT_MIN_SQNR_DB, show_default=True,
              help="Fail when a tensor's SQNR (dB) vs --against is lower.")
@click.option("--json", "as_json_", is_flag=True, help="Print JSON instead of a table.")
@cli_errors
def verify(path, against, min_sqnr, as_json_):
    """Check PATH's integrity and, with --against, its per-tensor error; exit 2 on any problem."""
    from . import render
    from .verify import as_json as verify_json
    from .verify import check_integrity, compare

    result = check_integrity(path)
    if against:
        compare(path, against, min_sqnr, result)
    click.echo(verify_json(result)) if as_json_ else render.verification(console, result)
    if not result.ok:
        raise VerifyFailed(f"{path}: {len(result.problems)} problem(s); first: {result.problems[0]}")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dtype", type=_DTYPES, default=None, help="Output dtype (default: each weight's recorded dtype).")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@cli_errors
def dequantize(path, out, dtype, max_shard_size, overwrite, quiet):
    """Decode the 4-bit checkpoint PATH back to a plain HF checkpoint OUT."""
    from .dequantize import dequantize as run_dequantize

    files = run_dequantize(path, out, dtype, parse_size(max_shard_size), overwrite, progress=not quiet)
    console.print(f"wrote {out}: {len(files)} file(s)")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing).")
@click.option("--dry-run", is_flag=True, help="Print the files and model card that would be uploaded; upload nothing.")
@click.option("--against", default=None, help="Source checkpoint, to put an error table in the model card.")
@click.option("--base-model", default=None, help="Hub id of the source (default: the one recorded by convert).")
@click.option("--quantized-by", default=None, help="quantized_by in the card's metadata (default: REPO_ID's namespace).")
@click.option("--large-folder-threshold", default="5GB", show_default=True,
              help="Folders larger than this go through huggingface_hub's resumable large-folder upload (several "
                   "commits; rerun to resume; the card is written to PATH/README.md first); smaller ones are one "
                   "commit.")
@click.option("--token", envvar="HF_TOKEN", default=None, help="Hub token (default: $HF_TOKEN or the saved login).")
@cli_errors
def publish(path, repo_id, private, revision, dry_run, against, base_model, quantized_by, large_folder_threshold,
            token):
    """Verify PATH, then create REPO_ID on the Hub and upload it (licence files included) with a model card."""
    from .publish import plan as publish_plan
    from .publish import upload

    threshold = parse_size(large_folder_threshold, "--large-folder-threshold")
    p = publish_plan(path, repo_id, revision, private, against, base_model, DEFAULT_MIN_SQNR_DB, quantized_by)
    if dry_run:
        how = "resumable large-folder upload" if p.total_bytes > threshold else "one commit"
        click.echo(f"would upload to {repo_id} (revision {revision or 'main'}, {'private' if private else 'public'}, "
                   f"{how}):")
        for name, size in p.files:
            click.echo(f"  {name}\t{size}")
        click.echo("--- README.md ---\n" + p.card)
        return
    if not p.licenses:
        console.print("[yellow]note:[/yellow] no LICENSE/NOTICE/USE_POLICY file in the folder")
    console.print(f"uploaded {len(p.files)} files: {upload(path, p, token, threshold)}")


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--quant-type", type=click.Choice(spec.QUANT_TYPES), default="nf4", show_default=True)
@click.option("--blocksize", type=click.Choice([str(b) for b in spec.BLOCKSIZES]), default="64", show_default=True)
@click.option("--double-quant/--no-double-quant", default=True, show_default=True)
@click.option("--json", "as_json_", is_flag=True, help="Print the per-tensor rows as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor, not only the worst 10.")
@cli_errors
def report(src, quant_type, blocksize, double_quant, as_json_, show_all):
    """Quantize SRC's linear weights in memory; print sizes and per-tensor error (SQNR, dB).

    SRC is a local Hugging Face checkpoint folder (model.safetensors or a sharded index).
    Nothing is written.
    """
    from . import render
    from .report import as_json, quantization_report

    rows = quantization_report(src, quant_type, int(blocksize), double_quant, show_progress=not as_json_)
    if as_json_:
        click.echo(as_json(rows))
        return
    render.report(console, rows, f"{quant_type} blocksize {blocksize} double-quant {double_quant}", show_all)
