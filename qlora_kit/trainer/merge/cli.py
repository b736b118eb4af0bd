"""`qtrain merge`: parse, call merge.run.merge, print the cost tables (rich) or --json."""
import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qlora_kit._cli import cli_errors
from qlora_kit._cli.options import parse_size

from .run import COMPARE_DTYPES, MergeResult, as_json
from .run import merge as run_merge
from .weights import FORMATS

LOST = 0.5  # update_error above which a tensor is counted as having lost much of its update

HELP = """Merge the LoRA adapter --adapter into the dequantized 4-bit checkpoint --base and write --out.

\b
W' = W_deq + s * B A in fp32, rounded once: W_deq is the 4-bit base decoded as training used it (not the
original bf16 weights, whose difference from W_deq the adapter never saw).
  --format bf16: a plain bf16 Hugging Face checkpoint (transformers, vLLM, qconvert convert all read it).
  --format nf4:  the merged weights re-quantized with the base's settings; other tensors copied byte for byte.
Prints what merging cost: per tensor, the error of the stored weight against the exact fp32 merge (relative to
the weight and to the adapter's update), and at the logits of a few prompts, the merged model against base +
adapter run by our runtime (max |diff|, top-1 agreement). OUT records the provenance in its safetensors
metadata (qconvert inspect shows it) and the same report in merge_report.json."""


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def render(console: Console, r: MergeResult, show_all: bool) -> None:
    costs = sorted(r.tensors, key=lambda t: -(t.update_error or 0.0))
    shown = costs if show_all else costs[:10]
    table = Table(title=f"{r.format} merge: {'all' if show_all else f'worst {len(shown)} of'} {len(costs)} "
                        "merged tensors (error of the stored weight vs the fp32 merge)")
    for col in ("tensor", "shape", "r", "scale", "rel. to weight", "rel. to update"):
        table.add_column(col, justify="left" if col == "tensor" else "right", overflow="fold")
    for t in shown:
        table.add_row(t.name, "x".join(map(str, t.shape)), str(t.rank), f"{t.scale:g}", _fmt(t.rel_error),
                      _fmt(t.update_error))
    console.print(table)
    lost = sum((t.update_error or 0.0) > LOST for t in costs)
    if lost:
        console.print(f"[yellow]note[/yellow]: in {lost} of {len(costs)} tensors the rounding error exceeds "
                      f"{LOST:.0%} of the adapter's update; serving base + adapter (qserve) keeps it whole"
                      + (", --format bf16 keeps more of it" if r.format == "nf4" else ""))
    if r.logits is not None:
        lc = r.logits
        table = Table(title=f"logits: merged model vs base + adapter (our runtime, {lc.compute_dtype} compute)")
        for col in ("prompt", "tokens", "max |diff|", "top-1 agree", "adapter effect"):
            table.add_column(col, justify="left" if col == "prompt" else "right")
        for p in lc.prompts:
            table.add_row(escape(p.prompt[:48]), str(p.tokens), f"{p.max_abs_diff:.3f}", f"{p.top1_agreement:.1%}",
                          f"{p.adapter_effect:.3f}")
        console.print(table)
        console.print(f"logits: max |diff| {lc.max_abs_diff:.3f} (the adapter itself moves them by up to "
                      f"{lc.adapter_effect:.3f}), top-1 agreement {lc.top1_agreement:.1%}")
    console.print(f"wrote {escape(str(r.out))}: {r.format}, {len(r.files)} file(s)", highlight=False)


@click.command("merge", help=HELP, context_settings={"max_content_width": 110})
@click.option("--base", required=True, help="The 4-bit checkpoint folder the adapter was trained on, or its Hub id (HF cache; "
              "HF_HUB_OFFLINE honoured).")
@click.option("--adapter", required=True, help="Adapter folder (qtrain train's --out, or any PEFT LoRA adapter).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (must not exist).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="bf16", show_default=True,
              help="bf16: plain HF checkpoint; nf4: re-quantized 4-bit checkpoint (FORMAT.md).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt for the logit comparison (repeatable; "
              "default: 5 built-in prompts).")
@click.option("--compare-dtype", type=click.Choice(COMPARE_DTYPES), default="float32", show_default=True,
              help="Compute dtype of the logit comparison: float32 isolates the merge's own cost; bfloat16 "
              "adds the compute noise of serving.")
@click.option("--no-compare", is_flag=True, help="Skip the logit comparison (it loads the model twice).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard file, e.g. 5GB or 500MiB.")
@click.option("--all", "show_all", is_flag=True, help="List every merged tensor, not only the worst 10.")
@click.option("--json", "as_json_", is_flag=True, help="Print the report as JSON instead of tables.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@cli_errors
def merge(base, adapter, out, fmt, prompts, compare_dtype, no_compare, overwrite, max_shard_size, show_all, as_json_,
          quiet):
    kwargs = {"prompts": tuple(prompts)} if prompts else {}
    result = run_merge(base, adapter, out, fmt, compare=not no_compare, compare_dtype=compare_dtype, overwrite=overwrite,
                       max_shard_size=parse_size(max_shard_size), progress=not quiet, **kwargs)
    click.echo(as_json(result)) if as_json_ else render(Console(soft_wrap=True), result, show_all)
