"""vLLM 0.32 + our qlora_nf4 plugin vs vLLM 0.27.1's in-tree bitsandbytes path, same NF4 checkpoint, same run.

    python -m bench.vllm [--batch 16] [--new-tokens 32] [--prompt-tokens 32] [--adapters 0,1,8] [--rank 16]
                         [--reps 3] [--threads N] [--dtype bfloat16] [--ours-python .venv-vllm/bin/python]
                         [--peer-python .venv-vllm027/bin/python] [--ckpt DIR] [--dequantize] [--json]

Workload (as ANCHORS.md's vLLM 0.27.1 CPU row): `batch` streamed completion requests sent at once, row i on
adapter i % n (n = 0: the base; r16 LoRA on all linear projections, random non-zero B), seeded random prompts
of `prompt-tokens` ids, greedy, exactly `new-tokens` tokens each (ignore_eos). tokens/s = batch * new_tokens
/ wall time of the batch (prefill included); first-token latency = median over requests of the time to the
first streamed token. Both servers get the same flags (eager, max_model_len 512, max_num_seqs = batch,
max_loras = the largest adapter count, LoRA rank `rank`) and differ only in --quantization/--load-format
(qlora_nf4 vs bitsandbytes) and in the interpreter they run in.

Timing (bench/_timing.py, as every bench): all servers are started first and stay up together; then, per
adapter count, one untimed warm-up batch each and --reps timed batches, the engines alternating (A B A B ...);
figures are median [min-max] with the outlier rule printed, and a verdict per adapter count. Threads: --threads
N (default: the cores this process may run on) pins both engines alike: OMP_NUM_THREADS=N and
VLLM_CPU_OMP_THREADS_BIND = the first N of this process's allowed CPUs (vLLM's CPU worker binds its OpenMP
threads to that list).
--dequantize (a shortcut, printed) adds a third engine: ours with QLORA_KIT_VLLM_DEQUANTIZE=1 (weights decoded
once at load by kernels.dequant and kept dense: 4x the weight memory, the native backend's --dequantize-base).
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

from bench._timing import Stats, begin, compare, end, interleave
from bench.serve import make_random_adapters
from qlora_kit.models import load_model
from qlora_kit.qconvert.convert import convert
from qlora_kit.qserve.vllm_backend.launch import VllmProcess, free_port

SRC = Path(".cache/smollm2-135m-instruct")
NAME = "smollm2"
KEY = "sk-bench-0000"


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


def _start(python, method, extra_env, ckpt, adapters, batch, dtype, rank, cpus, log) -> tuple[VllmProcess, float]:
    """One server, its OpenMP threads bound to `cpus`; returns it and its start-up seconds (to /health 200)."""
    port, key = free_port(), KEY
    argv = _argv(python, method, ckpt, port, key, batch, dtype, rank, adapters)
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
               VLLM_CPU_OMP_THREADS_BIND=cpus, **extra_env)
    t = time.perf_counter()
    proc = VllmProcess(argv, env, port, key, log).start(900)
    return proc, time.perf_counter() - t


def _cpus(n: int) -> str:
    """The first n CPUs this process may run on, as vLLM's bind list ("1" or "0,1")."""
    allowed = sorted(os.sched_getaffinity(0))
    if n > len(allowed):
        raise SystemExit(f"--threads {n}: this process may run on {len(allowed)} CPU(s) only ({allowed})")
    return ",".join(map(str, allowed[:n]))


@click.command()
@click.option("--batch", default=16, show_default=True, help="requests sent at once per timed batch")
@click.option("--new-tokens", default=32, show_default=True, help="greedy tokens per request (ignore_eos)")
@click.option("--prompt-tokens", default=32, show_default=True, help="random prompt ids per request")
@click.option("--adapters", "counts", default="0,1,8", show_default=True, help="Distinct adapters per batch.")
@click.option("--rank", default=16, show_default=True, help="LoRA rank of the random adapters")
@click.option("--reps", default=3, show_default=True, help="timed batches per engine and adapter count")
@click.option("--threads", type=int, default=None, help="OpenMP threads of each engine (default: this process's CPUs)")
@click.option("--dtype", default="bfloat16", show_default=True, help="activation dtype of both engines")
@click.option("--ours-python", default=".venv-vllm/bin/python", show_default=True,
              help="interpreter with vllm-cpu 0.32 and qlora-kit")
@click.option("--peer-python", default=".venv-vllm027/bin/python", show_default=True,
              help="interpreter with vllm-cpu 0.27.1 and bitsandbytes")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="NF4 checkpoint (default: convert SRC).")
@click.option("--dequantize", is_flag=True, help="Also run ours with weights dequantized once at load.")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
def main(batch, new_tokens, prompt_tokens, counts, rank, reps, threads, dtype, ours_python, peer_python, ckpt,
         dequantize, as_json):
    counts = [int(c) for c in counts.split(",")]
    shortcuts = ["--dequantize: a third engine, ours with the weights decoded once at load (4x weight memory)"] * dequantize
    n_threads = begin(threads, reps, shortcuts, default=len(os.sched_getaffinity(0)),
                      why="default: the CPUs this process may run on")
    cpus = _cpus(n_threads)
    print(f"engines: each server's OpenMP threads bound to CPU(s) {cpus} (VLLM_CPU_OMP_THREADS_BIND)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if ckpt is None:
            ckpt = tmp / NAME
            convert(str(SRC), ckpt, progress=False)
        adapters = _adapters(ckpt, tmp, max(counts), rank)
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        rng = random.Random(0)
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(prompt_tokens)] for _ in range(batch)]
        engines = {"ours": (ours_python, "qlora_nf4", {})}
        if dequantize:
            engines["ours-dequantized"] = (ours_python, "qlora_nf4", {"QLORA_KIT_VLLM_DEQUANTIZE": "1"})
        engines["peer"] = (peer_python, "bitsandbytes", {})
        procs, startup = {}, {}
        try:
            for name, (python, method, env) in engines.items():
                procs[name], startup[name] = _start(python, method, env, ckpt, adapters, batch, dtype, rank, cpus,
                                                    tmp / f"{name}.log")
            runs = {}
            for n in counts:
                sides = {name: (lambda p=p, n=n: dict(zip(("tok_s", "ttft_s"), asyncio.run(
                    _batch(p.url, KEY, prompts, n, new_tokens))))) for name, p in procs.items()}
                runs[n] = interleave(sides, reps, warmup=1)
                if not as_json:
                    print(f"{n or 'base'} adapters: " + "; ".join(
                        f"{k} {Stats.of(runs[n].values(k, 'tok_s')).fmt(digits=1)} tok/s, TTFT "
                        f"{Stats.of(runs[n].values(k, 'ttft_s')).fmt(unit=' s')}" for k in procs), flush=True)
        finally:
            for p in procs.values():
                p.stop()
    head = (f"vLLM 0.32 + qlora_nf4 (ours) vs vLLM 0.27.1 bitsandbytes (peer); batch {batch}, prompt {prompt_tokens}, "
            f"{new_tokens} new tokens, r{rank} all-linear, {dtype}, {n_threads} thread(s) per engine, commit {commit}")
    rows = []
    for name in (k for k in procs if k != "peer"):
        for n in counts:
            o, p = runs[n].values(name, "tok_s"), runs[n].values("peer", "tok_s")
            ot, pt = runs[n].values(name, "ttft_s"), runs[n].values("peer", "ttft_s")
            rows.append({"ours": name, "adapters": n, "ours_tok_s": o, "peer_tok_s": p, "ours_ttft_s": ot,
                         "peer_ttft_s": pt, "tok_s": compare(o, p, higher_is_better=True), "ttft": compare(ot, pt)})
    if as_json:
        print(json.dumps({"bench": "vllm", "config": head, "startup_s": startup, "reps": reps, "rows": [
            {k: (v.__dict__ if k in ("tok_s", "ttft") else v) for k, v in r.items()} for r in rows]}))
        end()
        return
    print(head)
    print("start-up s (to /health 200): " + ", ".join(f"{k} {v:.1f}" for k, v in startup.items()))
    print(f"{'ours':<16} {'adapters':>8} {'ours tok/s [min-max]':>22} {'peer tok/s [min-max]':>22} "
          f"{'ours TTFT s':>20} {'peer TTFT s':>20}")
    for r in rows:
        print(f"{r['ours']:<16} {r['adapters']:>8} {Stats.of(r['ours_tok_s']).fmt(digits=1):>22} "
              f"{Stats.of(r['peer_tok_s']).fmt(digits=1):>22} {Stats.of(r['ours_ttft_s']).fmt():>20} "
              f"{Stats.of(r['peer_ttft_s']).fmt():>20}")
    for r in rows:
        what = f"{r['adapters'] or 'base'} adapters"
        print(r["tok_s"].line(f"{what} tok/s", r["ours"], "peer"))
        print(r["ttft"].line(f"{what} first-token latency", r["ours"], "peer"))
    end()


if __name__ == "__main__":
    main()
