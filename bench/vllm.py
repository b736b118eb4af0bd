"""vLLM 0.32 + our qlora_nf4 plugin vs vLLM 0.27.1's in-tree bitsandbytes path, same NF4 checkpoint, same run.

    python -m bench.vllm [--batch 16] [--new-tokens 32] [--prompt-tokens 32] [--adapters 0,1,8] [--rank 16]
                         [--dtype bfloat16] [--ours-python .venv-vllm/bin/python]
                         [--peer-python .venv-vllm027/bin/python] [--ckpt DIR] [--dequantize] [--json]

Workload (as ANCHORS.md's vLLM 0.27.1 CPU row): `batch` streamed completion requests sent at once, row i on
adapter i % n (n = 0: the base; r16 LoRA on all linear projections, random non-zero B), seeded random prompts
of `prompt-tokens` ids, greedy, exactly `new-tokens` tokens each (ignore_eos). tokens/s = batch * new_tokens
/ wall time of the batch (prefill included); first-token latency = median over requests of the time to the
first streamed token. One warm-up batch per engine and adapter count. Both servers get the same flags
(eager, max_model_len 512, max_num_seqs = batch, max_loras 8, LoRA rank 16) and differ only in
--quantization/--load-format (qlora_nf4 vs bitsandbytes) and in the interpreter they run in.
--dequantize adds a third engine: ours with QLORA_KIT_VLLM_DEQUANTIZE=1 (weights decoded once at load by
kernels.dequant and kept dense: 4x the weight memory, the native backend's --dequantize-base).
"""
import asyncio
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import click
import httpx
import torch

from bench.serve import make_random_adapters
from qlora_kit.models import load_model
from qlora_kit.qconvert.convert import convert
from qlora_kit.qserve.vllm_backend.launch import VllmProcess, free_port

SRC = Path(".cache/smollm2-135m-instruct")
NAME = "smollm2"


def _adapters(ckpt: Path, root: Path, n: int, rank: int) -> list[Path]:
    return make_random_adapters(load_model(ckpt, compute_dtype=torch.float32), root, n, rank, str(ckpt))


def _argv(python: str, method: str, ckpt: Path, port: int, key: str, batch: int, dtype: str, rank: int,
          adapters: list[Path]) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--served-model-name", NAME,
            "--quantization", method, "--load-format", method, "--host", "127.0.0.1", "--port", str(port),
            "--api-key", key, "--dtype", dtype, "--max-model-len", "512", "--max-num-seqs", str(batch),
            "--enforce-eager", "--enable-lora", "--max-loras", str(max(1, len(adapters))), "--max-lora-rank",
            str(rank), "--disable-uvicorn-access-log"] + (["--lora-modules", *(f"a{i}={p}" for i, p in enumerate(adapters))]
                                                          if adapters else [])


async def _one(client, model, prompt, new_tokens, t0) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
    return first


async def _batch(url, key, prompts, n_adapters, new_tokens) -> tuple[float, float]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        names = [NAME if n_adapters == 0 else f"a{i % n_adapters}" for i in range(len(prompts))]
        t0 = time.perf_counter()
        firsts = await asyncio.gather(*(_one(client, m, p, new_tokens, t0) for m, p in zip(names, prompts)))
        wall = time.perf_counter() - t0
    return len(prompts) * new_tokens / wall, statistics.median(firsts)


def _engine(python, method, extra_env, ckpt, adapters, counts, prompts, new_tokens, dtype, rank, log) -> dict:
    port, key = free_port(), "sk-bench-0000"
    argv = _argv(python, method, ckpt, port, key, len(prompts), dtype, rank, adapters)
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", **extra_env)
    t = time.perf_counter()
    proc = VllmProcess(argv, env, port, key, log).start(900)
    out = {"startup_s": time.perf_counter() - t}
    try:
        for n in counts:
            asyncio.run(_batch(proc.url, key, prompts, n, new_tokens))  # warm-up
            out[n] = asyncio.run(_batch(proc.url, key, prompts, n, new_tokens))
    finally:
        proc.stop()
    return out


@click.command()
@click.option("--batch", default=16, show_default=True)
@click.option("--new-tokens", default=32, show_default=True)
@click.option("--prompt-tokens", default=32, show_default=True)
@click.option("--adapters", "counts", default="0,1,8", show_default=True, help="Distinct adapters per batch.")
@click.option("--rank", default=16, show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--ours-python", default=".venv-vllm/bin/python", show_default=True)
@click.option("--peer-python", default=".venv-vllm027/bin/python", show_default=True)
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="NF4 checkpoint (default: convert SRC).")
@click.option("--dequantize", is_flag=True, help="Also run ours with weights dequantized once at load.")
@click.option("--json", "as_json", is_flag=True)
def main(batch, new_tokens, prompt_tokens, counts, rank, dtype, ours_python, peer_python, ckpt, dequantize, as_json):
    counts = [int(c) for c in counts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if ckpt is None:
            ckpt = tmp / NAME
            convert(str(SRC), ckpt, progress=False)
        adapters = _adapters(ckpt, tmp, max(counts), rank)
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        rng = random.Random(0)
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(prompt_tokens)] for _ in range(batch)]
        args = (ckpt, adapters, counts, prompts, new_tokens, dtype, rank)
        variants = {"ours": {}, **({"ours-dequantized": {"QLORA_KIT_VLLM_DEQUANTIZE": "1"}} if dequantize else {})}
        results = {name: _engine(ours_python, "qlora_nf4", env, *args, tmp / f"{name}.log")
                   for name, env in variants.items()}
        peer = _engine(peer_python, "bitsandbytes", {}, *args, tmp / "peer.log")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for name, ours in results.items():
        for n in counts:
            (o_tps, o_ttft), (p_tps, p_ttft) = ours[n], peer[n]
            rows.append({"ours": name, "adapters": n, "ours_tok_s": round(o_tps, 1), "peer_tok_s": round(p_tps, 1),
                         "tok_s_ratio": round(o_tps / p_tps, 2), "ours_ttft_s": round(o_ttft, 3),
                         "peer_ttft_s": round(p_ttft, 3), "ttft_ratio": round(o_ttft / p_ttft, 2)})
    startup = {name: round(r["startup_s"], 1) for name, r in results.items()} | {"peer": round(peer["startup_s"], 1)}
    if as_json:
        print(json.dumps({"bench": "vllm", "commit": commit, "batch": batch, "new_tokens": new_tokens,
                          "prompt_tokens": prompt_tokens, "dtype": dtype, "device": "cpu", "startup_s": startup,
                          "rows": rows}))
        return
    print(f"vLLM 0.32 + qlora_nf4 (ours) vs vLLM 0.27.1 bitsandbytes (peer); batch {batch}, {new_tokens} new tokens, "
          f"{dtype}, commit {commit}")
    print("start-up s: " + ", ".join(f"{k} {v}" for k, v in startup.items()))
    print("ours              adapters  ours tok/s  peer tok/s  ratio   ours TTFT s  peer TTFT s  ratio (lower is better)")
    for r in rows:
        print(f"{r['ours']:<16}  {r['adapters']:>8}  {r['ours_tok_s']:>10}  {r['peer_tok_s']:>10}  {r['tok_s_ratio']:>5}   "
              f"{r['ours_ttft_s']:>11}  {r['peer_ttft_s']:>11}  {r['ttft_ratio']:>5}")


if __name__ == "__main__":
    main()
