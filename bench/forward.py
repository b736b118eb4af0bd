"""Prefill and decode tokens/s: ours vs transformers + bitsandbytes (and + PEFT with a LoRA adapter), one run.

Usage:  python -m bench.forward [--checkpoint NF4_DIR] [--src BF16_DIR] [--prompt-len 128] [--new-tokens 32]

Without --checkpoint, the bf16 model in --src (default: the bundled SmolLM2) is quantized to NF4 by
transformers + bitsandbytes into a temporary folder, the layout both runtimes load. Prints a table and
the ratios ours / peer (> 1 means ours is faster). Asserts nothing: correctness lives in tests/.
"""
import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qlora_kit.models import Batch, SamplingParams, generate, load_model, load_peft_adapter


def _nf4_checkpoint(src: Path, out: Path, device: str) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.bfloat16,
                                         device_map=device).save_pretrained(out)
    return out


def _time(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--src", type=Path, default=Path(".cache/smollm2-135m-instruct"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="bench_forward."))
    try:
        ckpt = args.checkpoint or _nf4_checkpoint(args.src, tmp / "nf4", device)
        ours = load_model(ckpt, device=device)
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device).eval()
        torch.manual_seed(0)
        ids = torch.randint(100, 10000, (args.batch, args.prompt_len), device=device)
        B, T, N = args.batch, args.prompt_len, args.new_tokens
        sp = SamplingParams(max_tokens=N, ignore_eos=True)
        rows = {}
        rows["ours"] = (
            _time(lambda: ours(Batch(ids), last_only=True), args.reps, device),
            _time(lambda: generate(ours, ids.tolist(), sp), args.reps, device))
        hf_gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
        rows["transformers+bnb"] = (
            _time(lambda: hf(ids, logits_to_keep=1), args.reps, device),
            _time(lambda: hf.generate(ids, **hf_gen), args.reps, device))
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device),
                              LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
        for name, prm in peft.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.02)
        peft.eval().save_pretrained(tmp / "adapter")
        load_peft_adapter(ours, tmp / "adapter", 0)
        aid = torch.zeros(B, dtype=torch.long, device=device)
        rows["ours+lora"] = (
            _time(lambda: ours(Batch(ids, adapter_ids=aid), last_only=True), args.reps, device),
            _time(lambda: generate(ours, ids.tolist(), sp, adapter_ids=[0] * B), args.reps, device))
        rows["peft+bnb"] = (
            _time(lambda: peft(ids, logits_to_keep=1), args.reps, device),
            _time(lambda: peft.generate(input_ids=ids, **hf_gen), args.reps, device))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch {B}, prompt {T} tokens, {N} new tokens; median of {args.reps}")
    print(f"{'runtime':<18}{'prefill tok/s':>15}{'decode tok/s':>15}")
    tps = {}
    for k, (prefill_s, gen_s) in rows.items():
        # decode time = generate() minus its own prefill; decode makes N - 1 forwards of B tokens
        decode_s = max(gen_s - prefill_s, 1e-9)
        tps[k] = (B * T / prefill_s, B * (N - 1) / decode_s)
        print(f"{k:<18}{tps[k][0]:>15.1f}{tps[k][1]:>15.1f}")
    for ours_k, peer_k in (("ours", "transformers+bnb"), ("ours+lora", "peft+bnb")):
        print(f"ratio {ours_k} / {peer_k}: prefill {tps[ours_k][0] / tps[peer_k][0]:.2f}x, "
              f"decode {tps[ours_k][1] / tps[peer_k][1]:.2f}x")


if __name__ == "__main__":
    main()
