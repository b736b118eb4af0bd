"""Multi-adapter serving throughput: generated tokens/s with 1, 8, 32 and 128 distinct adapters in one batch,
as a ratio to the base-only batch, through the qserve engine; and the same workload through PEFT's
mixed-adapter generate (`adapter_names`) as the peer, in the same run.

    python -m bench.serve [--batch 128] [--new-tokens 8] [--prompt-tokens 8] [--device cpu] [--dtype float32]
                          [--adapters 1,8,32,128] [--rank 16] [--json]
    python -m bench.serve --load-test 500,64 [--adapters 32] [--new-tokens 4]

The second form is issue 9's bounded load test over HTTP (the suite runs a smaller one): the openai client on
loopback sends N requests over `adapters` adapters at concurrency C, two rounds, and prints failures, p50/p99
latency, generated tok/s and the process RSS after each round.

Workload: `batch` requests submitted at once, row i uses adapter i % n (r16, all linear projections, random
non-zero B), seeded random prompts of `prompt-tokens` tokens, greedy, exactly `new-tokens` new tokens each
(ignore_eos). Tokens/s = batch * new_tokens / wall time of the whole batch (prefill included), after one
warm-up batch. Ours serves the NF4 checkpoint written by qconvert (with --dequantize-base on CPU, see
ServeConfig.dequantize_base); the peer runs transformers + PEFT on the same bf16 source in the same dtype.
"""
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import click
import torch

from qlora_kit.formats import LoraConfig
from qlora_kit.models import add_adapter, adapter_params, remove_adapter, save_peft_adapter
from qlora_kit.qconvert.convert import convert
from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.engine import SamplingParams
from qlora_kit.qserve.server import build_engine

SRC = Path(".cache/smollm2-135m-instruct")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapters(model, root: Path, n: int, rank: int) -> list[Path]:
    """n PEFT adapters of rank `rank` on TARGETS with seeded random non-zero B (seed i for adapter i)."""
    out = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        add_adapter(model, 999, cfg)
        with torch.no_grad():
            for name, p in adapter_params(model, 999).items():
                if ".lora_b." in name:
                    p.copy_(0.02 * torch.randn_like(p))
        save_peft_adapter(model, 999, root / f"a{i:03d}", cfg)
        remove_adapter(model, 999)
        out.append(root / f"a{i:03d}")
    return out


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(batch)]


async def _run_ours(engine, prompts, names, new_tokens) -> float:
    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    handles = [engine.add(p, sp, n) for p, n in zip(prompts, names)]

    async def drain(h):
        async for out in h:
            last = out
        return last.completion_tokens

    got = await asyncio.gather(*(drain(h) for h in handles))
    wall = time.perf_counter() - t0
    assert sum(got) == len(prompts) * new_tokens
    return sum(got) / wall


def _peer(folders, prompts, counts, new_tokens, dtype, device):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SRC, dtype=dtype).to(device).eval()
    n_max = max(counts)
    peft = PeftModel.from_pretrained(model, str(folders[0]), adapter_name="a000")
    for i in range(1, n_max):
        peft.load_adapter(str(folders[i]), adapter_name=f"a{i:03d}")
    ids = torch.tensor(prompts, device=device)
    out = {}
    for n in (0,) + tuple(counts):
        names = ["__base__"] * len(prompts) if n == 0 else [f"a{i % n:03d}" for i in range(len(prompts))]
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            peft.generate(input_ids=ids[:2], adapter_names=names[:2], **kw)  # warm-up
            t0 = time.perf_counter()
            peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
            out[n] = len(prompts) * new_tokens / (time.perf_counter() - t0)
            print(f"peft, {n or 'base'} adapters: {out[n]:.1f} tok/s", flush=True)
    return out


@click.command()
@click.option("--batch", default=128, show_default=True)
@click.option("--new-tokens", default=8, show_default=True)
@click.option("--prompt-tokens", default=8, show_default=True)
@click.option("--adapters", "counts", default="1,8,32,128", show_default=True)
@click.option("--rank", default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--peer/--no-peer", default=True, show_default=True)
@click.option("--as-json", "as_json", is_flag=True)
@click.option("--load-test", default=None, metavar="N,C", help="HTTP load test: N requests at concurrency C.")
def main(batch, new_tokens, prompt_tokens, counts, rank, device, dtype, peer, as_json, load_test):
    counts = tuple(int(c) for c in counts.split(","))
    if load_test:
        n, c = (int(x) for x in load_test.split(","))
        return _load_test(n, c, counts[0], new_tokens, rank, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smollm2-135m-instruct"
        convert(str(SRC), ckpt, progress=False)
        config = ServeConfig(str(ckpt), device=device, dtype=dtype, dequantize_base=device == "cpu",
                             max_loras=max(counts), max_num_seqs=batch,
                             max_num_batched_tokens=max(batch * (prompt_tokens + 1), 2048), max_model_len=256,
                             kv_cache_tokens=max(batch * (prompt_tokens + new_tokens + 16), 256), allowed_root=tmp)
        engine = build_engine(config)
        folders = make_random_adapters(engine.model, Path(tmp) / "adapters", max(counts), rank)
        for i, f in enumerate(folders):
            engine.registry.add(f"a{i:03d}", f, trusted=True)
        prompts = _prompts(batch, prompt_tokens, engine.model.cfg.vocab_size)
        ours = {}
        for n in (0,) + counts:
            names = [None] * batch if n == 0 else [f"a{i % n:03d}" for i in range(batch)]
            if n == 0:
                asyncio.run(_run_ours(engine, prompts[:4], names[:4], 2))  # warm-up
            ours[n] = asyncio.run(_run_ours(engine, prompts, names, new_tokens))
            if not as_json:
                print(f"ours, {n or 'base'} adapters: {ours[n]:.1f} tok/s", flush=True)
        engine.stop()
        theirs = _peer(folders, prompts, counts, new_tokens, getattr(torch, dtype), device) if peer else {}
    head = f"batch {batch}, prompt {prompt_tokens}, {new_tokens} new tokens, r{rank} all-linear, {device} {dtype}"
    rows = [(n, ours[n], theirs.get(n)) for n in (0,) + counts]
    if as_json:
        print(json.dumps({"config": head, "rows": rows}))
        return
    print(head)
    print(f"{'adapters':>8} {'ours tok/s':>11} {'vs base':>8} {'peft tok/s':>11} {'vs base':>8} {'ours/peft':>9}")
    for n, o, p in rows:
        pb = f"{p / theirs[0]:8.2f}" if p else f"{'-':>8}"
        print(f"{n if n else 'base':>8} {o:11.1f} {o / ours[0]:8.2f} {p or 0:11.1f} {pb} "
              f"{(o / p if p else float('nan')):9.2f}")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


async def _http_round(url, names, n, concurrency, new_tokens):
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    sem, lat, toks, fails = asyncio.Semaphore(concurrency), [], [], []

    async def one(i):
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.completions.create(model=names[i % len(names)], prompt=f"Request {i}: tell me",
                                                    max_tokens=new_tokens, temperature=0)
                toks.append(r.usage.completion_tokens)
                lat.append(time.perf_counter() - t0)
            except openai.OpenAIError as e:
                fails.append(repr(e))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    return lat, toks, fails, wall


def _load_test(n, concurrency, n_adapters, new_tokens, rank, device, dtype):
    import statistics

    from qlora_kit.qserve.server import start

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smollm2-135m-instruct"
        convert(str(SRC), ckpt, progress=False)
        config = ServeConfig(str(ckpt), device=device, dtype=dtype, dequantize_base=device == "cpu",
                             max_loras=min(n_adapters, 32), max_num_seqs=concurrency, max_waiting=max(n, 256),
                             max_model_len=256, kv_cache_tokens=concurrency * 64, allowed_root=tmp)
        handle = start(config)
        folders = make_random_adapters(handle.engine.model, Path(tmp) / "adapters", n_adapters, rank)
        names = [f"a{i:03d}" for i in range(n_adapters)]
        for name, f in zip(names, folders):
            handle.engine.registry.add(name, f, trusted=True)
        for rnd in range(2):
            lat, toks, fails, wall = asyncio.run(_http_round(handle.url, names, n, concurrency, new_tokens))
            q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
            print(f"round {rnd}: {n} requests over {n_adapters} adapters at concurrency {concurrency}: "
                  f"{len(fails)} failures, p50 {q[49]:.2f} s, p99 {q[98]:.2f} s, "
                  f"{sum(toks) / wall:.1f} generated tok/s, wall {wall:.1f} s, RSS {_rss_mb():.0f} MB", flush=True)
        handle.stop()


if __name__ == "__main__":
    main()
