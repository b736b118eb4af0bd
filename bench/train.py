"""QLoRA training throughput and peak memory: qtrain vs PEFT + bitsandbytes (QLoRA recipe) vs PEFT 16-bit LoRA.

    python -m bench.train [--base NF4_DIR] [--bf16 BF16_DIR] [--seq 256] [--batch 4] [--rank 16] [--steps 3]
                          [--reps 2] [--threads N] [--json]

Same model, data (the shipped Quillfeather chats, packed into --batch rows of --seq tokens), rank (all linear
layers, alpha = 2 r, no dropout), gradient checkpointing and bf16 compute for all three. Each provider runs in its
own subprocess, --reps times, the providers alternating (A B C A B C, bench._timing.interleave), with the same
pinned thread count (--threads, default this machine's cores). Memory, each figure labelled (bench/_memory.py):
  tracked peak  tensor bytes: model parameters + buffers (the 4-bit base included) + optimizer state + LoRA
                grads + the peak of live saved-for-backward activations (saved_tensors_hooks); on CUDA
                torch.cuda.max_memory_allocated (the allocator's own peak) instead
  peak RSS      the process's ru_maxrss: also the interpreter, the imported libraries and allocator slack
  qtrain     our NF4 decoder + LoRA, per-layer checkpointing, chunked cross-entropy, paged AdamW (trainer.optim)
  peft_bnb   transformers + bitsandbytes 4-bit base, prepare_model_for_kbit_training(use_gradient_checkpointing=True),
             PEFT LoRA, bitsandbytes PagedAdamW32bit on CUDA (torch AdamW on CPU, where bnb has no paged optimizer)
  peft_bf16  transformers bf16 base, gradient checkpointing, PEFT LoRA, torch AdamW
tok/s = batch * seq / median step time after one warm-up step, per run; the summary is the median [min-max]
over runs. Ratios are qtrain / peer.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import click
import torch

from bench._memory import TensorBytes, peak_rss_mb
from bench._timing import Stats, begin, compare, end, interleave

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


def _qtrain_step(base: str, rank: int, device: torch.device):
    from qlora_kit.trainer.batching import StepBatch
    from qlora_kit.trainer.config import build_config
    from qlora_kit.trainer.many.mix import part_losses
    from qlora_kit.trainer import setup

    from qlora_kit.models import Batch

    cfg = build_config(None, base=base, data="-", out="-", r=rank, lora_alpha=2.0 * rank, lora_dropout=0.0,
                       device=device.type)
    model = setup.load_base(cfg.base, cfg.compute_dtype, device)
    _, params = setup.attach_adapter(model, cfg, 0)
    opt = setup.build_optimizer(params, cfg)
    model.train()

    def step(ids):
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        sb = StepBatch(Batch(ids, adapter_ids=torch.zeros(ids.shape[0], dtype=torch.long, device=device)), labels,
                       ids.numel(), int((labels != -100).sum()))
        loss = part_losses(model, sb, [slice(None)], True, cfg.loss_chunk_size)[0] / sb.num_loss_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model, opt


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
    return step, model, opt


def worker(provider: str, base: str, bf16: str, seq: int, batch: int, rank: int, steps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ids = _tokens(base, seq, batch).to(device)
    if provider == "qtrain":
        step, model, opt = _qtrain_step(base, rank, device)
    else:
        step, model, opt = _peft_step(base if provider == "peft_bnb" else bf16, rank, device, provider == "peft_bnb")
    times = []
    with TensorBytes(model, opt) as mem:
        for _ in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    median = statistics.median(times[1:])
    tracked = mem.report()
    if device.type == "cuda":
        tracked["tracked_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return {"provider": provider, "device": device.type, "threads": torch.get_num_threads(),
            "tok_s": seq * batch / median, "step_s": median, "peak_rss_mb": peak_rss_mb(), **tracked,
            "step_times": times}


@click.command()
@click.option("--base", default=".cache/smollm2-135m-instruct-nf4", show_default=True,
              help="NF4 checkpoint (qconvert convert); loads in transformers + bitsandbytes too")
@click.option("--bf16", default=".cache/smollm2-135m-instruct", show_default=True, help="bf16 checkpoint for peft_bf16")
@click.option("--seq", default=256, show_default=True)
@click.option("--batch", default=4, show_default=True)
@click.option("--rank", default=16, show_default=True)
@click.option("--steps", default=3, show_default=True, help="timed steps after one warm-up step, per run")
@click.option("--reps", default=2, show_default=True, help="runs (fresh subprocesses) per provider, interleaved")
@click.option("--threads", type=int, default=None, help="intra-op threads for every provider (default: cores)")
@click.option("--providers", default=",".join(PROVIDERS), show_default=True)
@click.option("--worker", "worker_", default=None, hidden=True)
@click.option("--json", "as_json", is_flag=True)
def main(base, bf16, seq, batch, rank, steps, reps, threads, providers, worker_, as_json):
    """Time QLoRA training steps of qtrain and its peers; print tok/s, memory (labelled) and ratios."""
    if worker_:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print(json.dumps(worker(worker_, base, bf16, seq, batch, rank, steps)))
        return
    begin(threads, reps)
    if not Path(base).is_dir():
        subprocess.run([str(Path(sys.executable).parent / "qconvert"), "convert", bf16, base, "--quiet"], check=True)

    def side(p):
        cmd = [sys.executable, "-m", "bench.train", "--worker", p, "--base", base, "--bf16", bf16, "--seq", str(seq),
               "--batch", str(batch), "--rank", str(rank), "--steps", str(steps)]
        return lambda: json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True
                                                 ).stdout.strip().splitlines()[-1])
    names = providers.split(",")
    runs = interleave({p: side(p) for p in names}, reps).samples
    if as_json:
        print(json.dumps(runs, indent=2))
        end()
        return
    dev = runs[names[0]][0]["device"]
    mem_label = "CUDA max_memory_allocated" if dev == "cuda" else "tracked tensor peak"
    print(f"seq {seq} x batch {batch}, LoRA r{rank} all linear, gradient checkpointing, bf16, device {dev}, "
          f"{runs[names[0]][0]['threads']} thread(s); median [min-max] of {reps} run(s)")
    print("per run: " + "; ".join(f"{p} run {i}: {r['tok_s']:.1f} tok/s, {r['tracked_peak_mb']:.0f} MiB tracked, "
                                  f"{r['peak_rss_mb']:.0f} MiB RSS" for p in names for i, r in enumerate(runs[p])))
    print(f"{'provider':<10} {'tok/s':>20} {mem_label + ' MiB':>30} {'(model/optim/grads/activ.)':>27} "
          f"{'peak RSS MiB':>20}")
    for p in names:
        rs = runs[p]
        parts = "/".join(f"{statistics.median(r[k] for r in rs):.0f}"
                         for k in ("model_mb", "optimizer_mb", "grads_mb", "activations_peak_mb"))
        print(f"{p:<10} {Stats.of([r['tok_s'] for r in rs]).fmt(digits=1):>20} "
              f"{Stats.of([r['tracked_peak_mb'] for r in rs]).fmt(digits=0):>30} {parts:>27} "
              f"{Stats.of([r['peak_rss_mb'] for r in rs]).fmt(digits=0):>20}")
    if "qtrain" in runs:
        q = runs["qtrain"]
        for p in names:
            if p == "qtrain":
                continue
            print(compare([r["tok_s"] for r in q], [r["tok_s"] for r in runs[p]], higher_is_better=True).line(
                "tok/s", "qtrain", p))
            for key, label in (("tracked_peak_mb", mem_label), ("peak_rss_mb", "peak RSS")):
                print(f"memory qtrain / {p}, {label}: "
                      f"{statistics.median(r[key] for r in q) / statistics.median(r[key] for r in runs[p]):.2f}")
    end()


if __name__ == "__main__":
    main()
