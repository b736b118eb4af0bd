"""QLoRA training throughput and peak memory: qtrain vs PEFT + bitsandbytes (QLoRA recipe) vs PEFT 16-bit LoRA.

    python -m bench.train [--base NF4_DIR] [--bf16 BF16_DIR] [--seq 256] [--batch 4] [--rank 16] [--steps 3] [--json]

Same model, data (the shipped Quillfeather chats, packed into --batch rows of --seq tokens), rank (all linear
layers, alpha = 2 r, no dropout), gradient checkpointing and bf16 compute for all three. Each provider runs in its
own subprocess so peak memory is its own: peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA.
  qtrain     our NF4 decoder + LoRA, per-layer checkpointing, chunked cross-entropy, paged AdamW (trainer.optim)
  peft_bnb   transformers + bitsandbytes 4-bit base, prepare_model_for_kbit_training(use_gradient_checkpointing=True),
             PEFT LoRA, bitsandbytes PagedAdamW32bit on CUDA (torch AdamW on CPU, where bnb has no paged optimizer)
  peft_bf16  transformers bf16 base, gradient checkpointing, PEFT LoRA, torch AdamW
tok/s = batch * seq / median step time after one warm-up step. Ratios are qtrain / peer.
"""
import json
import resource
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import click
import torch

PROVIDERS = ("qtrain", "peft_bnb", "peft_bf16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokens(folder: str, seq: int, batch: int) -> torch.Tensor:
    from qlora_kit.models import Tokenizer

    tok = Tokenizer(folder)
    path = resources.files("qlora_kit.trainer") / "datasets" / "quillfeather.jsonl"
    ids = []
    for line in path.read_text().splitlines():
        ids += tok.encode_chat(json.loads(line)["messages"], add_generation_prompt=False)
        if len(ids) >= seq * batch:
            break
    return torch.tensor(ids[:seq * batch]).view(batch, seq)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _qtrain_step(base: str, rank: int, device: torch.device):
    from qlora_kit.trainer.batching import StepBatch
    from qlora_kit.trainer.config import build_config
    from qlora_kit.trainer.forward import summed_loss
    from qlora_kit.trainer import setup

    from qlora_kit.models import Batch

    cfg = build_config(None, base=base, data="-", out="-", r=rank, lora_alpha=2.0 * rank, lora_dropout=0.0,
                       device=device.type)
    model = setup.load_base(cfg, device)
    _, params = setup.attach_adapter(model, cfg)
    opt = setup.build_optimizer(params, cfg)
    model.train()

    def step(ids):
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        sb = StepBatch(Batch(ids, adapter_ids=torch.zeros(ids.shape[0], dtype=torch.long, device=device)), labels,
                       ids.numel(), int((labels != -100).sum()))
        loss = summed_loss(model, sb, True, cfg.loss_chunk_size) / sb.num_loss_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _peft_step(folder: str, rank: int, device: torch.device, quantized: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device.type)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    if quantized and device.type == "cuda":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4)
    model.train()

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def worker(provider: str, base: str, bf16: str, seq: int, batch: int, rank: int, steps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ids = _tokens(base, seq, batch).to(device)
    if provider == "qtrain":
        step = _qtrain_step(base, rank, device)
    else:
        step = _peft_step(base if provider == "peft_bnb" else bf16, rank, device, provider == "peft_bnb")
    times = []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    median = statistics.median(times[1:])
    return {"provider": provider, "device": device.type, "tok_s": seq * batch / median, "step_s": median,
            "peak_mb": _peak_mb(device), "step_times": times}


@click.command()
@click.option("--base", default=".cache/smollm2-135m-instruct-nf4", show_default=True,
              help="NF4 checkpoint (qconvert convert); loads in transformers + bitsandbytes too")
@click.option("--bf16", default=".cache/smollm2-135m-instruct", show_default=True, help="bf16 checkpoint for peft_bf16")
@click.option("--seq", default=256, show_default=True)
@click.option("--batch", default=4, show_default=True)
@click.option("--rank", default=16, show_default=True)
@click.option("--steps", default=3, show_default=True, help="timed steps after one warm-up step")
@click.option("--providers", default=",".join(PROVIDERS), show_default=True)
@click.option("--worker", "worker_", default=None, hidden=True)
@click.option("--json", "as_json", is_flag=True)
def main(base, bf16, seq, batch, rank, steps, providers, worker_, as_json):
    """Time one QLoRA training step of qtrain and its peers; print tok/s, peak memory and ratios."""
    if worker_:
        print(json.dumps(worker(worker_, base, bf16, seq, batch, rank, steps)))
        return
    if not Path(base).is_dir():
        subprocess.run([str(Path(sys.executable).parent / "qconvert"), "convert", bf16, base, "--quiet"], check=True)
    rows = []
    for p in providers.split(","):
        cmd = [sys.executable, "-m", "bench.train", "--worker", p, "--base", base, "--bf16", bf16, "--seq", str(seq),
               "--batch", str(batch), "--rank", str(rank), "--steps", str(steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ours = next((r for r in rows if r["provider"] == "qtrain"), None)
    for r in rows:
        if ours is not None:
            r["tok_s_ratio"] = ours["tok_s"] / r["tok_s"]
            r["peak_ratio"] = ours["peak_mb"] / r["peak_mb"]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"seq {seq} x batch {batch}, LoRA r{rank} all linear, gradient checkpointing, bf16, device {rows[0]['device']}")
    print(f"{'provider':<10} {'tok/s':>8} {'step s':>8} {'peak MiB':>9} {'qtrain tok/s x':>15} {'qtrain mem x':>13}")
    for r in rows:
        print(f"{r['provider']:<10} {r['tok_s']:>8.1f} {r['step_s']:>8.2f} {r['peak_mb']:>9.0f} "
              f"{r.get('tok_s_ratio', float('nan')):>15.2f} {r.get('peak_ratio', float('nan')):>13.2f}")


if __name__ == "__main__":
    main()
