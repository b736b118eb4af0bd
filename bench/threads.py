"""Why ServeConfig.threads defaults to 1: small ops in a non-main thread at 1 and 2 intra-op threads.

    python -m bench.threads [--reps 200]

Each configuration runs in a fresh child process (torch's OpenMP pool is per process): the op is timed in the
main thread, or in a new thread (like qserve's engine step thread) that first calls torch.set_num_threads(n).
Ops: index_add of 16 rows of 576 into 128 x 576 (LoRA's scatter of one adapter's rows in SmolLM2) and a
128 x 576 @ 576 x 576 matmul (one projection of a 128-row decode batch), float32. Median [min-max] per call.
"""
import json
import subprocess
import sys
import threading
import time

import click

from bench._timing import Stats, load_line


def _child(n: int, where: str, reps: int) -> dict:
    import torch

    torch.set_num_threads(n)
    x, src, idx = torch.zeros(128, 576), torch.randn(16, 576), torch.arange(16)
    a, w = torch.randn(128, 576), torch.randn(576, 576)
    out = {}

    def bench():
        torch.set_num_threads(n)
        for name, fn in (("index_add", lambda: x.index_add(0, idx, src)), ("matmul", lambda: a @ w)):
            for _ in range(10):
                fn()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            out[name] = ts
    if where == "main":
        bench()
    else:
        th = threading.Thread(target=bench)
        th.start()
        th.join()
    return out


@click.command()
@click.option("--reps", default=200, show_default=True)
@click.option("--child", nargs=2, default=None, hidden=True)
def main(reps, child):
    if child:
        print(json.dumps(_child(int(child[0]), child[1], reps)))
        return
    print(load_line("before"))
    for n in (1, 2):
        for where in ("main", "worker"):
            out = subprocess.run([sys.executable, "-m", "bench.threads", "--reps", str(reps), "--child", str(n), where],
                                 check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            print(f"{n} thread(s), {where:>6} thread: " + ", ".join(
                f"{k} {Stats.of(v).fmt(1e6, ' us', 1)}" for k, v in res.items()), flush=True)
    print(load_line("after"))


if __name__ == "__main__":
    main()
