"""Prefill and decode tokens/s on the 4-bit base: ours vs transformers + bitsandbytes (and + PEFT with a LoRA
adapter), the four runtimes interleaved.

    python -m bench.forward [--checkpoint NF4_DIR] [--src BF16_DIR] [--prompt-len 128] [--new-tokens 32]
                            [--batch 1] [--reps 5] [--threads N] [--dense-base]

Without --checkpoint, the bf16 model in --src (default: the bundled SmolLM2) is quantized to NF4 + double quant
by transformers + bitsandbytes into a temporary folder, the layout both runtimes load. Ours keeps the 4-bit
base (what users get); --dense-base is an explicit, printed shortcut (qserve's ServeConfig.dequantize_base).

Measured directly, never by subtraction: forward hooks on each runtime's top module time every forward call
of one greedy generate() of --new-tokens tokens. Call 1 is the prefill (batch x prompt tokens); calls 2..N
are the decode steps (batch tokens each). Per rep: prefill seconds and the median decode step; prefill tok/s =
batch * prompt / prefill s, decode tok/s = batch / decode step s. Reps alternate the four runtimes
(bench._timing.interleave) after one warm-up generate each. Ratios are ours / peer; > 1 means ours is faster.
Asserts nothing about speed: correctness lives in tests/.
"""
import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._timing import Stats, begin, compare, end, interleave
from qlora_kit.models import SamplingParams, generate, load_model, load_peft_adapter


def _nf4_checkpoint(src: Path, out: Path, device: str) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.bfloat16,
                                         device_map=device).save_pretrained(out)
    return out


class CallTimer:
    """Seconds of every forward call of `module` (pre- and post-forward hooks; CUDA synchronised)."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.times: list[float] = []
        self._sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, mod, args):
        self._sync()
        self._t = time.perf_counter()

    def _post(self, mod, args, out):
        self._sync()
        self.times.append(time.perf_counter() - self._t)

    def run(self, fn, expected_calls: int) -> dict:
        self.times = []
        fn()
        if len(self.times) != expected_calls:
            raise SystemExit(f"expected {expected_calls} forward calls (1 prefill + decode steps), got "
                             f"{len(self.times)}: generate() changed; fix bench/forward.py")
        decode = self.times[1:]
        return {"prefill_s": self.times[0], "decode_step_s": statistics.median(decode) if decode else float("nan")}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--src", type=Path, default=Path(".cache/smollm2-135m-instruct"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every runtime (default: cores)")
    p.add_argument("--dense-base", action="store_true", help="shortcut: ours decodes a dense copy of the base")
    args = p.parse_args()
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (one prefill + at least one decode step)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shortcuts = ["--dense-base: ours holds a dense copy of the base (4x weight memory)"] if args.dense_base else []
    n_threads = begin(args.threads, args.reps, shortcuts)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    B, T, N = args.batch, args.prompt_len, args.new_tokens
    tmp = Path(tempfile.mkdtemp(prefix="bench_forward."))
    try:
        ckpt = args.checkpoint or _nf4_checkpoint(args.src, tmp / "nf4", device)
        ours = load_model(ckpt, device=device)
        if args.dense_base:
            from qlora_kit.qserve.server import dequantize_bases

            dequantize_bases(ours)
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device).eval()
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device),
                              LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
        for name, prm in peft.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.02)
        peft.eval().save_pretrained(tmp / "adapter")
        load_peft_adapter(ours, tmp / "adapter", 0)
        torch.manual_seed(0)
        ids = torch.randint(100, 10000, (B, T), device=device)
        sp = SamplingParams(max_tokens=N, ignore_eos=True)
        hf_gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
        t_ours, t_hf, t_peft = CallTimer(ours, device), CallTimer(hf, device), CallTimer(peft.base_model.model, device)
        sides = {
            "ours": lambda: t_ours.run(lambda: generate(ours, ids.tolist(), sp), N),
            "transformers+bnb": lambda: t_hf.run(lambda: hf.generate(ids, **hf_gen), N),
            "ours+lora": lambda: t_ours.run(lambda: generate(ours, ids.tolist(), sp, adapter_ids=[0] * B), N),
            "peft+bnb": lambda: t_peft.run(lambda: peft.generate(input_ids=ids, **hf_gen), N),
        }
        runs = interleave(sides, args.reps, warmup=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({n_threads} threads)"
    print(f"device: {name}; batch {B}, prompt {T} tokens, {N} new tokens ({N - 1} timed decode steps per rep); "
          f"{'dense base (--dense-base)' if args.dense_base else '4-bit base'}; median [min-max] of {args.reps} reps")
    print(f"{'runtime':<18}{'prefill tok/s':>26}{'decode tok/s':>26}{'decode ms/step':>26}")
    rate = {}
    for k in sides:
        pre = [B * T / r["prefill_s"] for r in runs.samples[k]]
        dec = [B / r["decode_step_s"] for r in runs.samples[k]]
        rate[k] = (pre, dec)
        ms = Stats.of([r["decode_step_s"] for r in runs.samples[k]]).fmt(1e3, digits=1)
        print(f"{k:<18}{Stats.of(pre).fmt(digits=1):>26}{Stats.of(dec).fmt(digits=1):>26}{ms:>26}")
    for ours_k, peer_k in (("ours", "transformers+bnb"), ("ours+lora", "peft+bnb")):
        for i, what in ((0, "prefill"), (1, "decode")):
            print(compare(rate[ours_k][i], rate[peer_k][i], higher_is_better=True).line(what, ours_k, peer_k))
    end()


if __name__ == "__main__":
    main()
