"""A fleet of adapters loaded on demand from an --adapter-store: throughput against the same workload over 8
adapters and over the base alone, time to first token, loads and evictions.

    python -m bench.fleet [--adapters 1000] [--requests 3000] [--concurrency 64] [--zipf 1.1] [--slots N]
                          [--host-adapters N] [--new-tokens 4] [--prompt-tokens 8] [--rank 8] [--reps 1]
                          [--threads N] [--dtype bfloat16] [--dense-base] [--json]

Default configuration = what `qserve serve` users get (the 4-bit base, bfloat16, ServeConfig.threads), plus the
fleet flags: --adapter-store with `adapters` adapters, --max-loras `slots` and --cpu-adapter-budget of
`host-adapters` adapters' bytes (defaults: slots = the concurrency, SLOTS_RULE below; host-adapters =
max(64, 2 x slots), since resident adapters count in the host budget). Adapters: rank `rank` on q_proj and v_proj,
random A and non-zero B in bf16, written straight into the store (seed i for adapter i).

Workload (one trace, three sides): `requests` completions, adapter k drawn Zipf(`zipf`) over the fleet (seeded),
prompt = `prompt-tokens` seeded random token ids, greedy, exactly `new-tokens` new tokens (ignore_eos),
streamed (SSE) at concurrency `concurrency` over loopback HTTP to an in-process server. Sides: `fleet` (adapter
k), `8 adapters` (adapter k mod 8, the same trace), `base` (no adapter). Each side runs one untimed warm-up of
`concurrency` requests, then `reps` timed rounds, sides interleaved (bench._timing.interleave). Throughput =
generated tokens / wall time of a round; TTFT = request start to its first streamed token, p50/p99 over all
timed requests of a side. Loads and evictions are counted over the timed fleet rounds (the registry's
FleetStats: qserve:adapter_loads_total / qserve:adapter_evictions_total), per side, and so are the engine's steps:
tokens/step = the model's input tokens (prompt + new tokens - 1 per request) / steps, the batch fill.
"""
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import click
import httpx
import torch

from bench._timing import Stats, begin, end, interleave
from qlora_kit.formats import LoraConfig, save_adapter
from qlora_kit.formats.peft import KEY_PREFIX, LORA_A, LORA_B
from qlora_kit.models import load_config, projection_shapes
from qlora_kit.qconvert.convert import convert
from qlora_kit.qserve.config import ENGINE_THREADS, ServeConfig
from qlora_kit.qserve.server import start

# The default --slots, chosen by measurement (bench/results/fleet.md): a CPU step's cost barely depends on its rows (the
# base's weights are read once a step), so throughput follows batch fill; with fewer slots than requests in flight the
# Zipf tail's requests wait for a slot and the batch runs part-empty (8 slots at concurrency 32: 97 steps for the
# work the 8-adapter trace does in 50). On CPU a slot is ~1 MB of host RAM and the rows kernel's cost is per row, not
# per adapter, so one slot per request in flight costs little.
SLOTS_RULE = "default = the concurrency: one slot per request in flight, so no request waits for a slot"
SRC = Path(os.environ.get("QLORA_KIT_SMOLLM2", ".cache/smollm2-135m-instruct"))
TARGETS = ("q_proj", "v_proj")


def write_store(store: Path, n: int, rank: int, base: str, shapes: dict) -> int:
    """n adapters named a0000... into `store`; returns one adapter's bytes as served (bf16)."""
    nbytes = 0
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for path, (in_f, out_f) in shapes.items():
            if path.rsplit(".", 1)[-1] in TARGETS:
                tensors[f"{KEY_PREFIX}{path}.{LORA_A}"] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).bfloat16()
                tensors[f"{KEY_PREFIX}{path}.{LORA_B}"] = (0.02 * torch.randn(out_f, rank, generator=g)).bfloat16()
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, base_model_name_or_path=base)
        save_adapter(store / f"a{i:04d}", cfg, tensors)
        nbytes = sum(t.nbytes for t in tensors.values())
    return nbytes


def zipf_trace(n: int, k: int, s: float, seed: int = 0) -> list[int]:
    rnd = random.Random(seed)
    return rnd.choices(range(k), weights=[1 / (i + 1) ** s for i in range(k)], k=n)


async def _round(url: str, models: list[str | None], prompts: list[list[int]], base: str, concurrency: int,
                 new_tokens: int) -> dict:
    sem, ttft, toks, fails = asyncio.Semaphore(concurrency), [], [], []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def one(model, prompt):
            body = {"model": model or base, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with sem:
                t0, first = time.perf_counter(), None
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        fails.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                            first = time.perf_counter() - t0
                        if chunk.get("usage"):
                            toks.append(chunk["usage"]["completion_tokens"])
                ttft.append(first if first is not None else time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(m, p) for m, p in zip(models, prompts)))
        wall = time.perf_counter() - t0
    if fails:
        raise SystemExit(f"{len(fails)} requests failed, e.g. {fails[0]}")
    return {"tok_s": sum(toks) / wall, "wall_s": wall, "ttft": ttft}


def _q(xs: list[float], p: int) -> float:
    return statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]


@click.command()
@click.option("--adapters", "n_adapters", default=1000, show_default=True, help="Adapters in the store.")
@click.option("--requests", "n_requests", default=3000, show_default=True, help="Requests per timed round.")
@click.option("--concurrency", default=64, show_default=True, help="Requests in flight.")
@click.option("--zipf", default=1.1, show_default=True, help="Zipf exponent of the adapter popularity.")
@click.option("--slots", type=int, default=None,
              help="Resident adapter slots (--max-loras); default: the concurrency (SLOTS_RULE).")
@click.option("--host-adapters", type=int, default=None,
              help="--cpu-adapter-budget as this many adapters' bytes; default: max(64, 2 x slots) (resident "
                   "adapters count in it).")
@click.option("--new-tokens", default=4, show_default=True)
@click.option("--prompt-tokens", default=8, show_default=True)
@click.option("--rank", default=8, show_default=True)
@click.option("--reps", default=1, show_default=True, help="Timed rounds per side (interleaved).")
@click.option("--threads", type=int, default=None, help="Intra-op threads of this process (the HTTP client).")
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--dense-base", is_flag=True, help="ServeConfig.dequantize_base (a shortcut: printed).")
@click.option("--as-json", "--json", "as_json", is_flag=True)
def main(n_adapters, n_requests, concurrency, zipf, slots, host_adapters, new_tokens, prompt_tokens, rank, reps,
         threads, dtype, dense_base, as_json):
    begin(threads, reps, ["--dense-base: a dense copy of the base (4x weight memory)"] * dense_base)
    why = SLOTS_RULE if slots is None else "--slots, explicit"
    slots = concurrency if slots is None else slots
    host_adapters = max(64, 2 * slots) if host_adapters is None else host_adapters
    print(f"slots: {slots} ({why})", flush=True)
    print(f"engine step thread: {ENGINE_THREADS} intra-op thread(s) (ServeConfig.threads, the default)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smollm2-135m-instruct"
        convert(str(SRC), ckpt, progress=False)
        t0 = time.perf_counter()
        nbytes = write_store(Path(tmp) / "store", n_adapters, rank, ckpt.name, projection_shapes(load_config(ckpt)))
        print(f"store: {n_adapters} adapters r{rank} on {'+'.join(TARGETS)}, {nbytes} bytes each, written in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        config = ServeConfig(str(ckpt), dtype=dtype, dequantize_base=dense_base, adapter_store=str(Path(tmp) / "store"),
                             max_loras=slots, cpu_adapter_budget=str(host_adapters * nbytes),
                             max_num_seqs=concurrency, max_num_batched_tokens=max(1024, concurrency * prompt_tokens),
                             max_model_len=64, kv_cache_tokens=max(4096, concurrency * 64), max_waiting=4096, port=0)
        handle = start(config)
        reg, base = handle.engine.registry, config.served_name
        rnd = random.Random(1)
        vocab = handle.engine.model.cfg.vocab_size
        prompts = [[rnd.randrange(100, vocab - 100) for _ in range(prompt_tokens)] for _ in range(n_requests)]
        trace = zipf_trace(n_requests, n_adapters, zipf)
        workloads = {"fleet": [f"a{k:04d}" for k in trace], "8 adapters": [f"a{k % 8:04d}" for k in trace],
                     "base": [None] * n_requests}
        for name, models in workloads.items():  # warm-up: untimed
            asyncio.run(_round(handle.url, models[:concurrency], prompts[:concurrency], base, concurrency, new_tokens))
        results: dict[str, list[dict]] = {k: [] for k in workloads}
        delta = {k: {"loads": {}, "evictions": {}, "requests": {}} for k in workloads}
        steps = dict.fromkeys(workloads, 0)  # engine steps in the timed rounds: fewer = fuller batches

        def side(name):
            def run():
                before, step0 = reg.stats.snapshot(), handle.engine.steps
                r = asyncio.run(_round(handle.url, workloads[name], prompts, base, concurrency, new_tokens))
                after = reg.stats.snapshot()
                steps[name] += handle.engine.steps - step0
                for key, d in delta[name].items():  # this side's own loads, evictions and tier hits
                    for t in after[key]:
                        d[t] = d.get(t, 0) + after[key][t] - before[key][t]
                results[name].append(r)
                return r["tok_s"]
            return run

        runs = interleave({k: side(k) for k in workloads}, reps)
        handle.stop()
    loads, evictions, hits = (delta["fleet"][k] for k in ("loads", "evictions", "requests"))
    med = {k: Stats.of(runs.samples[k]).median for k in workloads}
    head = (f"{n_adapters} adapters (Zipf {zipf}), {n_requests} requests, concurrency {concurrency}, {slots} slots, "
            f"host budget {host_adapters} adapters ({host_adapters * nbytes} B), prompt {prompt_tokens}, "
            f"{new_tokens} new tokens, {dtype}, {'dense base (--dense-base)' if dense_base else '4-bit base'}")
    per_step = {k: reps * n_requests * (prompt_tokens + new_tokens - 1) / max(1, steps[k]) for k in workloads}
    summary = {"config": head, "tok_s": runs.samples, "per_side": delta, "steps": steps, "tokens_per_step": per_step,
               "ttft_p50_s": {k: _q([t for r in v for t in r["ttft"]], 50) for k, v in results.items()},
               "ttft_p99_s": {k: _q([t for r in v for t in r["ttft"]], 99) for k, v in results.items()},
               "fleet_vs_8": med["fleet"] / med["8 adapters"], "fleet_vs_base": med["fleet"] / med["base"]}
    if as_json:
        print(json.dumps(summary))
    else:
        print(head)
        print(f"{'side':>10} {'tok/s [min-max]':>22} {'vs 8 adapters':>14} {'vs base':>8} {'TTFT p50':>9} {'p99':>8} "
              f"{'steps':>6} {'tokens/step':>11}")
        for k in workloads:
            print(f"{k:>10} {Stats.of(runs.samples[k]).fmt(digits=1):>22} {med[k] / med['8 adapters']:14.2f} "
                  f"{med[k] / med['base']:8.2f} {summary['ttft_p50_s'][k]:8.2f}s {summary['ttft_p99_s'][k]:7.2f}s "
                  f"{steps[k]:6d} {per_step[k]:11.1f}")
        print(f"fleet rounds: loads {loads} (host = reads from the store), evictions {evictions}, "
              f"requests by the tier their adapter was in {hits}")
        print(f"8-adapter rounds: loads {delta['8 adapters']['loads']}, evictions {delta['8 adapters']['evictions']}")
        print(f"goal: fleet >= 0.80 of the 8-adapter throughput: {summary['fleet_vs_8']:.2f} "
              f"({'met' if summary['fleet_vs_8'] >= 0.8 else 'NOT met'})")
    end()


if __name__ == "__main__":
    main()
