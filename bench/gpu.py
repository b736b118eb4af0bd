"""The ANCHORS.md GPU rows, ours beside the peer in one run (needs a CUDA device; prints a JSON line per row).

    python -m bench.gpu [--rows copy,dequant,matmul,multi,train] [--train-shapes 1b,8b] [--workdir DIR]

  copy     device copy bandwidth: torch clone of 512 MiB (read + write)
  dequant  NF4 + double quant -> bf16 at 4096x4096 and 14336x4096: ours vs bitsandbytes dequantize_4bit, GB/s r+w
  matmul   x[M, 4096] @ W[4096, 4096]^T at M = 1 / 16 / 64: ours (kernels.nf4_matmul) vs bnb matmul_4bit vs bf16
  multi    the 7 projections of one Llama-3-8B decoder layer at batch 16 with 1 / 4 / 16 distinct r16 adapters:
           nf4_matmul + lora_multi (ours) vs the bf16 base alone; linear layers only, times 32 layers = the step's
           linear cost (ANCHORS' row is end-to-end HF generate tok/s; this row isolates the part our kernels own)
  train    QLoRA step at the Llama-3.2-1B / Llama-3-8B shapes (random weights, seq 2048, batch 1, r16 all linear,
           checkpointing): builds bf16 checkpoints in --workdir, converts them with qconvert, runs bench.train
           (qtrain vs PEFT + bnb vs PEFT bf16 LoRA)

Figures are medians of triton.testing.do_bench; GB/s counts bytes read + written as kernels/ref/dequant.py states.
"""
import json
import subprocess
import sys
from pathlib import Path

import click
import torch

LLAMA = {  # (hidden, intermediate, layers, heads, kv heads, vocab): Llama-3.2-1B and Llama-3-8B
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}


def _us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3


def _bnb(packed):
    import bitsandbytes.functional as bnbf

    from qlora_kit.formats import to_entries

    entries = to_entries("w", packed)
    return entries["w"], bnbf.QuantState.from_dict({k[2:]: v for k, v in entries.items() if k != "w"}, packed.data.device)


def row_copy():
    x = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    t = _us(lambda: x.clone())
    yield {"row": "device copy 512 MiB", "us": t, "GBps": 2 * x.numel() / t / 1e3}


def row_dequant():
    import bitsandbytes.functional as bnbf

    from qlora_kit.formats import quantize_4bit
    from qlora_kit.kernels import dequant

    for n, k in ((4096, 4096), (14336, 4096)):
        packed = quantize_4bit((torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16), "nf4", 64, True)
        data, qs = _bnb(packed)
        moved = packed.nbytes + 2 * n * k
        ours, peer = _us(lambda: dequant(packed)), _us(lambda: bnbf.dequantize_4bit(data, qs))
        yield {"row": f"dequant {n}x{k}", "ours_us": ours, "ours_GBps": moved / ours / 1e3, "bnb_us": peer,
               "bnb_GBps": moved / peer / 1e3, "ratio_bnb_over_ours": peer / ours}


def row_matmul():
    import bitsandbytes as bnb

    from qlora_kit.formats import quantize_4bit
    from qlora_kit.kernels import nf4_matmul

    w = (torch.randn(4096, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    packed = quantize_4bit(w, "nf4", 64, True)
    data, qs = _bnb(packed)
    for m in (1, 16, 64):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        ours = _us(lambda: nf4_matmul(x, packed))
        peer = _us(lambda: bnb.matmul_4bit(x, data.t(), quant_state=qs))
        dense = _us(lambda: x @ w.t())
        yield {"row": f"matmul x[{m},4096] @ W^T", "ours_us": ours, "bnb_us": peer, "bf16_us": dense,
               "ratio_bnb_over_ours": peer / ours, "ratio_bf16_over_ours": dense / ours}


def row_multi():
    from qlora_kit.formats import quantize_4bit
    from qlora_kit.kernels import lora_multi, nf4_matmul

    h, f, _, heads, kv, _ = LLAMA["8b"]
    d = h // heads
    shapes = [(h, h), (kv * d, h), (kv * d, h), (h, h), (f, h), (f, h), (h, f)]  # q k v o gate up down: (N, K)
    weights = [(torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16) for n, k in shapes]
    packed = [quantize_4bit(w, "nf4", 64, True) for w in weights]
    x = {k: torch.randn(16, k, device="cuda", dtype=torch.bfloat16) for k in {k for _, k in shapes}}
    base = _us(lambda: [x[k] @ w.t() for w, (_, k) in zip(weights, shapes)])
    for n_adapters in (1, 4, 16):
        r = 16
        ids = torch.arange(16, device="cuda") % n_adapters
        offs = torch.arange(n_adapters + 1, device="cuda") * r
        scales = torch.full((n_adapters,), 2.0, device="cuda")
        ab = [((torch.randn(n_adapters * r, k, device="cuda") / 64).to(torch.bfloat16),
               (torch.randn(n, n_adapters * r, device="cuda") / 4).to(torch.bfloat16)) for n, k in shapes]

        def layer():
            return [lora_multi(nf4_matmul(x[k], p), x[k], ids, a, b, offs, scales)
                    for p, (a, b), (_, k) in zip(packed, ab, shapes)]

        ours = _us(layer)
        yield {"row": f"8B layer linears, batch 16, {n_adapters} adapters", "ours_us_per_layer": ours,
               "bf16_base_only_us_per_layer": base, "ours_step_linear_ms": 32 * ours / 1e3,
               "ratio_bf16_base_over_ours": base / ours}


def _checkpoint(shape: str, workdir: Path) -> tuple[Path, Path]:
    """Random-weight bf16 Llama checkpoint at `shape` plus its qconvert NF4 copy (tokenizer from the bundled SmolLM2)."""
    import os
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    h, f, layers, heads, kv, vocab = LLAMA[shape]
    bf16, nf4 = workdir / f"llama-{shape}-bf16", workdir / f"llama-{shape}-nf4"
    if not bf16.exists():
        cfg = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192)
        with torch.device("cuda"):
            LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(bf16)
        tok = Path(os.environ.get("QLORA_KIT_SMOLLM2", ".cache/smollm2-135m-instruct"))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tok / name).exists():
                shutil.copy(tok / name, bf16 / name)
    if not nf4.exists():
        subprocess.run([sys.executable, "-m", "qlora_kit.qconvert", str(bf16), str(nf4), "--device", "cuda"], check=True)
    return bf16, nf4


def row_train(shapes: list[str], workdir: Path):
    for shape in shapes:
        bf16, nf4 = _checkpoint(shape, workdir)
        out = subprocess.run([sys.executable, "-m", "bench.train", "--base", str(nf4), "--bf16", str(bf16), "--seq", "2048",
                              "--batch", "1", "--rank", "16", "--steps", "3", "--json"], capture_output=True, text=True)
        yield {"row": f"QLoRA step Llama {shape} shape", "rc": out.returncode, "bench.train": out.stdout.strip()[-4000:],
               "stderr": out.stderr[-1000:] if out.returncode else ""}


ROWS = {"copy": row_copy, "dequant": row_dequant, "matmul": row_matmul, "multi": row_multi, "train": row_train}


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--rows", default=",".join(ROWS), show_default=True, help="comma-separated subset of " + ", ".join(ROWS))
@click.option("--train-shapes", default="1b,8b", show_default=True, help="Llama shapes for the train row: 1b, 8b")
@click.option("--workdir", default=".cache/bench-gpu", show_default=True, type=click.Path(file_okay=False),
              help="where the train row writes its random-weight checkpoints")
def main(rows, train_shapes, workdir):
    if not torch.cuda.is_available():
        raise click.UsageError("bench.gpu needs a CUDA device; none is visible")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in rows.split(","):
        if name not in ROWS:
            raise click.BadParameter(f"{name!r}: use one of {', '.join(ROWS)}", param_hint="--rows")
        gen = ROWS[name](train_shapes.split(","), Path(workdir)) if name == "train" else ROWS[name]()
        for row in gen:
            print(json.dumps({**info, **row}), flush=True)


if __name__ == "__main__":
    main()
