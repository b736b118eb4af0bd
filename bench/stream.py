"""Per-token server time over one long stream: the first `window` tokens vs the last `window` (issue 15: with
incremental detokenization a 2,000-token stream costs O(n), so the per-token time stays flat).

    python -m bench.stream [--tokens 2000] [--window 100] [--dtype bfloat16]

1. The whole server: SmolLM2-135M-Instruct (qconvert NF4, ServeConfig defaults otherwise) behind `qserve`'s HTTP
   app on loopback; one streamed completion of exactly `tokens` tokens (greedy, ignore_eos); the gap between
   consecutive SSE chunks is the per-token server time. Median of the first and of the last `window` gaps and
   their ratio. The model step is included, and attention over a 2,000-token context costs more per token than
   over 20, so this ratio bounds from above what detokenization adds.
2. The detokenizer alone, on the token ids of that stream's text: engine/detokenizer.py (what the engine runs)
   against a full re-decode of all output ids per step (the engine before issue 15). Median us/token of the first
   and last `window` tokens, ratio, and the tokens passed to decode per step.

Noisy on a shared machine: the load average is printed before and after. Asserts nothing (tests/ does:
tests/unit/qserve/test_detokenizer.py counts the decode work deterministically).
"""
import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import httpx

from bench._timing import load_line
from qlora_kit.models import Tokenizer
from qlora_kit.qconvert.convert import convert
from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.engine.detokenizer import Detokenizer
from qlora_kit.qserve.server import start

SMOLLM2_DIR = Path(os.environ.get("QLORA_KIT_SMOLLM2", ".cache/smollm2-135m-instruct"))
PROMPT = "Write a long story about a tea shop in the mountains, with many characters and places:"


def _ratio(samples: list[float], window: int) -> tuple[float, float, float]:
    first, last = statistics.median(samples[:window]), statistics.median(samples[-window:])
    return first, last, last / first


def _stream(url: str, model: str, tokens: int) -> tuple[list[float], str]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    gaps, parts, last = [], [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=None) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            parts.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["text"])
    return gaps, "".join(parts)


def _detok_times(tok: Tokenizer, ids: list[int], incremental: bool) -> tuple[list[float], list[int]]:
    times, work = [], []
    d = Detokenizer(tok)
    for i in range(len(ids)):
        t0 = time.perf_counter()
        if incremental:
            before = d.tokens_decoded
            d.step(ids[i:i + 1], i == len(ids) - 1)
            work.append(d.tokens_decoded - before)
        else:
            tok.decode(ids[:i + 1])
            work.append(i + 1)
        times.append(time.perf_counter() - t0)
    return times, work


@click.command()
@click.option("--tokens", default=2000, show_default=True, help="Tokens in the one streamed completion.")
@click.option("--window", default=100, show_default=True, help="Tokens compared at the start and at the end.")
@click.option("--dtype", default="bfloat16", show_default=True, help="Compute dtype of the served model.")
def main(tokens, window, dtype):
    print(load_line("before"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smollm2-135m-instruct"
        convert(str(SMOLLM2_DIR), ckpt, progress=False)
        config = ServeConfig(str(ckpt), port=0, dtype=dtype, max_model_len=tokens + 64, max_tokens_limit=tokens,
                             kv_cache_tokens=tokens + 64)
        handle = start(config)
        try:
            _stream(handle.url, config.served_name, 8)  # warm-up
            gaps, text = _stream(handle.url, config.served_name, tokens)
        finally:
            handle.stop()
    f, la, r = _ratio(gaps, window)
    print(f"server, {len(gaps) + 1} tokens streamed: per-token gap median first {window} {f * 1e3:.2f} ms, "
          f"last {window} {la * 1e3:.2f} ms, ratio {r:.2f}", flush=True)
    tok = Tokenizer(SMOLLM2_DIR)
    ids = tok.encode(text, add_special_tokens=False)[:tokens]
    for incremental in (True, False):
        times, work = _detok_times(tok, ids, incremental)
        f, la, r = _ratio(times, window)
        name = "incremental (engine/detokenizer.py)" if incremental else "full re-decode per step (before)"
        print(f"detokenizer {name}, {len(ids)} tokens: median first {window} {f * 1e6:.1f} us/token, last {window} "
              f"{la * 1e6:.1f} us/token, ratio {r:.2f}; tokens decoded per step: first {sum(work[:window])}, "
              f"last {sum(work[-window:])} over {window} steps", flush=True)
    print(load_line("after"), flush=True)


if __name__ == "__main__":
    main()
