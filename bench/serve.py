"""Multi-adapter serving throughput: generated tokens/s with 1, 8, 32 and 128 distinct adapters in one batch,
as a ratio to the base-only batch, through the qserve engine; and the same workload through PEFT's
mixed-adapter generate (`adapter_names`) as the peer, in the same process, interleaved with ours.

    python -m bench.serve [--batch 128] [--new-tokens 8] [--prompt-tokens 8] [--adapters 1,8,32,128]
                          [--reps 3] [--threads N] [--engine-threads N] [--dense-base] [--dtype bfloat16] [--json]
    python -m bench.serve --load-test 500,64 [--adapters 32] [--new-tokens 4]

Default configuration = what `qserve serve` users get: the 4-bit NF4 base written by qconvert (no dense copy),
ServeConfig's dtype (bfloat16) and engine step-thread count (ServeConfig.threads). Shortcuts are flags and
are printed: --dense-base (ServeConfig.dequantize_base: a dense copy, 4x the weight memory), --engine-threads.
--threads pins this process's intra-op threads (the peer runs in this process; the engine's step thread sets
its own count from ServeConfig.threads, as in `qserve serve`).

Workload: `batch` requests submitted at once, row i uses adapter i % n (r16, all linear projections, random
non-zero B), seeded random prompts of `prompt-tokens` tokens, greedy, exactly `new-tokens` new tokens each
(ignore_eos). Tokens/s = batch * new_tokens / wall time of the whole batch (prefill included). At every
adapter count both sides first run one untimed warm-up batch (which also makes the adapters resident), then
--reps timed batches, ours and the peer alternating (bench._timing.interleave). The peer runs transformers +
PEFT on the same bf16 source in the same dtype. Figures are median [min-max] of the reps.
Ours' "vs base" ratio at n adapters comes from its own interleaving of ours alone: --reps batches of n adapters
and of base-only, alternating, with no peer batch between them, so the ratio pairs adjacent batches (base-only at
n = 0 runs minutes earlier: across quiet runs its speed moved 71.6-86.2 tok/s, more than the adapter batches did,
and ratios taken across stages read 0.80-0.97; bench/results/serve.md).

The second form is issue 9's bounded load test over HTTP (the suite runs a smaller one): the openai client on
loopback sends N requests over `adapters` adapters at concurrency C, two rounds, and prints failures, p50/p99
latency, generated tok/s and the process RSS after each round.
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
from bench._timing import Stats, begin, compare, end, interleave
from qlora_kit.qserve.config import ENGINE_THREADS, ServeConfig
from qlora_kit.qserve.engine import SamplingParams
from qlora_kit.qserve.server import build_engine

SRC = Path(".cache/smollm2-135m-instruct")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapters(model, root: Path, n: int, rank: int, base_model: str) -> list[Path]:
    """n PEFT adapters of rank `rank` on TARGETS with seeded random non-zero B (seed i for adapter i), each naming
    `base_model` as its base (the server refuses an adapter that names none)."""
    out = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, base_model_name_or_path=base_model)
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


def _peer_model(folders, n_max, dtype, device):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SRC, dtype=dtype).to(device).eval()
    peft = PeftModel.from_pretrained(model, str(folders[0]), adapter_name="a000")
    for i in range(1, n_max):
        peft.load_adapter(str(folders[i]), adapter_name=f"a{i:03d}")
    return peft


def _run_peer(peft, ids, names, new_tokens) -> float:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
        return ids.shape[0] * new_tokens / (time.perf_counter() - t0)


@click.command()
@click.option("--batch", default=128, show_default=True)
@click.option("--new-tokens", default=8, show_default=True)
@click.option("--prompt-tokens", default=8, show_default=True)
@click.option("--adapters", "counts", default="1,8,32,128", show_default=True)
@click.option("--rank", default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default=ServeConfig.__dataclass_fields__["dtype"].default, show_default=True)
@click.option("--reps", default=3, show_default=True, help="timed batches per side and adapter count")
@click.option("--threads", type=int, default=None, help="intra-op threads of this process (the peer); default: cores")
@click.option("--engine-threads", type=int, default=None,
              help=f"override ServeConfig.threads of the engine's step thread (default {ENGINE_THREADS})")
@click.option("--dense-base", is_flag=True, help="shortcut: serve a dense copy of the base (ServeConfig.dequantize_base)")
@click.option("--peer/--no-peer", default=True, show_default=True)
@click.option("--as-json", "--json", "as_json", is_flag=True)
@click.option("--load-test", default=None, metavar="N,C", help="HTTP load test: N requests at concurrency C.")
def main(batch, new_tokens, prompt_tokens, counts, rank, device, dtype, reps, threads, engine_threads, dense_base,
         peer, as_json, load_test):
    counts = tuple(int(c) for c in counts.split(","))
    if load_test:
        n, c = (int(x) for x in load_test.split(","))
        return _load_test(n, c, counts[0], new_tokens, rank, device, dtype, dense_base)
    shortcuts = (["--dense-base: ours serves a dense copy of the base (4x weight memory), not the 4-bit base"]
                 * dense_base + [f"--engine-threads {engine_threads}"] * (engine_threads is not None))
    if not peer:
        shortcuts.append("--no-peer")
    n_threads = begin(threads, reps, shortcuts)
    eng_threads = engine_threads or ENGINE_THREADS
    print(f"engine step thread: {eng_threads} intra-op thread(s) (ServeConfig.threads"
          f"{'' if engine_threads else ', the default'})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smollm2-135m-instruct"
        convert(str(SRC), ckpt, progress=False)
        config = ServeConfig(str(ckpt), device=device, dtype=dtype, dequantize_base=dense_base, threads=eng_threads,
                             max_loras=max(counts), max_num_seqs=batch,
                             max_num_batched_tokens=max(batch * (prompt_tokens + 1), 2048), max_model_len=256,
                             kv_cache_tokens=max(batch * (prompt_tokens + new_tokens + 16), 256), allowed_root=tmp)
        engine = build_engine(config)
        folders = make_random_adapters(engine.model, Path(tmp) / "adapters", max(counts), rank, str(ckpt))
        for i, f in enumerate(folders):
            engine.registry.add(f"a{i:03d}", f, trusted=True)
        prompts = _prompts(batch, prompt_tokens, engine.model.cfg.vocab_size)
        peft = _peer_model(folders, max(counts), getattr(torch, dtype), device) if peer else None
        ids = torch.tensor(prompts, device=device)
        runs, alone = {}, {}
        base_side = lambda: asyncio.run(_run_ours(engine, prompts, [None] * batch, new_tokens))
        for n in (0,) + counts:
            names = [None] * batch if n == 0 else [f"a{i % n:03d}" for i in range(batch)]
            sides = {"ours": lambda: asyncio.run(_run_ours(engine, prompts, names, new_tokens))}
            if peer:
                pnames = ["__base__" if a is None else a for a in names]
                sides["peft"] = lambda: _run_peer(peft, ids, pnames, new_tokens)
            runs[n] = interleave(sides, reps, warmup=1).samples
            if not as_json:
                print(f"{n or 'base'} adapters: " + ", ".join(
                    f"{k} {Stats.of(v).fmt(digits=1)} tok/s" for k, v in runs[n].items()), flush=True)
            if n:  # ours alone, n adapters and base-only alternating: the "vs base" ratio
                alone[n] = interleave({"ours": sides["ours"], "base": base_side}, reps).samples
                if not as_json:
                    print(f"{n} adapters, ours alone: " + ", ".join(
                        f"{k} {Stats.of(v).fmt(digits=1)} tok/s" for k, v in alone[n].items()), flush=True)
        engine.stop()
    head = (f"batch {batch}, prompt {prompt_tokens}, {new_tokens} new tokens, r{rank} all-linear, {device} {dtype}, "
            f"{'dense base (--dense-base)' if dense_base else '4-bit base'}, threads {n_threads} "
            f"(engine step thread {eng_threads})")
    if as_json:
        print(json.dumps({"config": head, "runs": {str(k): v for k, v in runs.items()},
                          "ours_alone": {str(k): v for k, v in alone.items()}}))
        end()
        return
    med = {n: {k: Stats.of(v).median for k, v in r.items()} for n, r in runs.items()}
    vs_base = {n: compare(alone[n]["ours"], alone[n]["base"], higher_is_better=True) for n in counts}
    print(head)
    print(f"{'adapters':>8} {'ours tok/s [min-max]':>24} {'vs base':>8} {'peft tok/s [min-max]':>24} {'vs base':>8}"
          "   (ours' vs base: from ours alone, interleaved with base-only; the peer's: from its own runs)")
    for n in (0,) + counts:
        o = Stats.of(runs[n]["ours"])
        p = Stats.of(runs[n]["peft"]) if peer else None
        print(f"{n if n else 'base':>8} {o.fmt(digits=1):>24} {vs_base[n].ratio if n else 1.0:8.2f} "
              f"{p.fmt(digits=1) if p else '-':>24} {p.median / med[0]['peft'] if p else float('nan'):8.2f}")
    for n, v in vs_base.items():
        print(f"ours alone, {n} adapters / base-only tok/s: {v.ratio:.2f} (per-pair spread {v.lo:.2f}-{v.hi:.2f}; "
              f"{v.pairs} pairs)")
    if peer:
        for n in (0,) + counts:
            print(compare(runs[n]["ours"], runs[n]["peft"], higher_is_better=True).line(
                f"{n or 'base'} adapters tok/s", "ours", "peft"))
    end()


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


def _load_test(n, concurrency, n_adapters, new_tokens, rank, device, dtype, dense_base):
    import statistics

    from qlora_kit.qserve.server import start

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smollm2-135m-instruct"
        convert(str(SRC), ckpt, progress=False)
        config = ServeConfig(str(ckpt), port=0, device=device, dtype=dtype, dequantize_base=dense_base,
                             max_loras=min(n_adapters, 32), max_num_seqs=concurrency, max_waiting=max(n, 256),
                             max_model_len=256, kv_cache_tokens=concurrency * 64, allowed_root=tmp)
        handle = start(config)
        folders = make_random_adapters(handle.engine.model, Path(tmp) / "adapters", n_adapters, rank, str(ckpt))
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
