"""Time each kernel: torch twin vs Triton (CUDA only) vs a peer where one exists.

    python -m bench.bench_kernels            # CUDA if present, else CPU with small shapes
    python -m bench.bench_kernels --small    # small shapes on any device

Reports (bench._timing.measure) the median time and its 20/80 quantiles, converted to GB/s or TFLOP/s with the formula in each
twin's leading comment (kernels/ref/<op>.py). Asserts nothing: correctness lives in tests/.
"""
import argparse

import torch
import torch.nn.functional as F

from bench._timing import load_line, measure, pin_threads, threads_line
from qlora_kit.formats import quantize_4bit
from qlora_kit.kernels import adamw8bit, chunked_cross_entropy, lora, lora_multi, nf4_matmul, rmsnorm, rope, swiglu
from qlora_kit.trainer.optim import signed_dynamic_map, unsigned_dynamic_map

try:
    import bitsandbytes as bnb

    HAS_BNB = True
except ImportError:
    HAS_BNB = False


def _cases(device: torch.device, small: bool):
    """(op, shape label, unit, work per call, {provider: fn}) for each op."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    sz = torch.finfo(dt).bits // 8
    M, H, I, V = (64, 512, 1376, 8000) if small else (4096, 4096, 11008, 32000)
    mk = lambda *s: torch.randn(*s, device=device, dtype=dt)  # noqa: E731

    x, w = mk(M, H), mk(H)
    yield "rmsnorm", f"{M}x{H}", "GB/s", 2 * M * H * sz, {
        p: (lambda p=p: rmsnorm(x, w, backend=p)) for p in ("torch", "triton")
    } | {"peer: F.rms_norm": lambda: F.rms_norm(x, (H,), w, 1e-6)}

    nh, s, hd = H // 128, M, 128
    q = mk(1, nh, s, hd)
    cos, sin = mk(s, hd), mk(s, hd)
    yield "rope", f"1x{nh}x{s}x{hd}", "GB/s", 2 * q.numel() * sz, {p: (lambda p=p: rope(q, cos, sin, backend=p)) for p in ("torch", "triton")}

    g, u = mk(M, I), mk(M, I)
    yield "swiglu", f"{M}x{I}", "GB/s", 3 * M * I * sz, {
        p: (lambda p=p: swiglu(g, u, backend=p)) for p in ("torch", "triton")
    } | {"peer: F.silu*up": lambda: F.silu(g) * u}

    T = M if small else 8192
    hid, head = mk(T, H).requires_grad_(), mk(V, H)
    labels = torch.randint(0, V, (T,), device=device)
    yield "chunked_cross_entropy", f"T{T} H{H} V{V}", "TFLOP/s", 4 * T * V * H, {
        p: (lambda p=p: chunked_cross_entropy(hid, head, labels, chunk_size=1024, backend=p).backward()) for p in ("torch", "triton")
    } | {"peer: F.cross_entropy (full logits)": lambda: F.cross_entropy((hid @ head.t()).float(), labels).backward()}

    wq = torch.randn(H, H, device=device, dtype=dt) * 0.02
    packed = quantize_4bit(wq, "nf4", 64, True)
    xm = mk(M, H)
    cases = {p: (lambda p=p: nf4_matmul(xm, packed, backend=p)) for p in ("torch", "triton")}
    if HAS_BNB:
        qw, qs = bnb.functional.quantize_4bit(wq, blocksize=64, quant_type="nf4", compress_statistics=True)
        cases["peer: bnb.matmul_4bit"] = lambda: bnb.matmul_4bit(xm, qw.t(), quant_state=qs)
    yield "nf4_matmul", f"{M}x{H} @ {H}x{H}", "TFLOP/s", 2 * M * H * H, cases

    r = 16
    base, la, lb = mk(M, H), mk(r, H), mk(H, r)
    yield "lora", f"{M}x{H} r{r}", "GB/s", (2 * M * H + M * H) * sz, {
        p: (lambda p=p: lora(base, xm, la, lb, 2.0, backend=p)) for p in ("torch", "triton")
    } | {"peer: PEFT formula": lambda: base + (xm @ la.t()) @ lb.t() * 2.0}

    ranks = [8, 16, 32, 64]
    ma, mb = mk(sum(ranks), H), mk(H, sum(ranks))
    offs = torch.tensor([0] + ranks, device=device).cumsum(0)
    scales = torch.full((len(ranks),), 2.0, device=device)
    ids = torch.randint(-1, len(ranks), (M,), device=device)
    yield "lora_multi", f"{M}x{H} 4 adapters", "GB/s", (2 * M * H + M * H) * sz, {
        p: (lambda p=p: lora_multi(base, xm, ids, ma, mb, offs, scales, backend=p)) for p in ("torch", "triton")
    }

    n = 1 << (18 if small else 24)
    prm, grd = torch.randn(n, device=device), torch.randn(n, device=device)
    st = [torch.zeros(n, dtype=torch.uint8, device=device) for _ in range(2)]
    am = [torch.zeros(n // 256, device=device) for _ in range(2)]
    q1, q2 = signed_dynamic_map(device), unsigned_dynamic_map(device)
    cases = {p: (lambda p=p: adamw8bit(prm, grd, *st, *am, q1, q2, 1, 1e-4, 0.9, 0.999, 1e-8, 0.0, backend=p)) for p in ("torch", "triton")}
    if HAS_BNB:
        cases["peer: bnb 8-bit blockwise"] = lambda: torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
            "adam", grd, prm, st[0], st[1], 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-4, q1, q2, am[0], am[1], 0.0, 1.0, False)
    yield "adamw8bit", f"n={n}", "GB/s", n * (4 * 4 + 4), cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small shapes (default on CPU)")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per provider on CPU")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: this machine's cores)")
    args = ap.parse_args()
    print(threads_line(pin_threads(args.threads), args.threads is not None))
    print("providers run one after another (a kernel microbenchmark, not a headline); " + load_line("before"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}   shapes: {'small' if small else 'llama-7b'}")
    for op, shape, unit, work, providers in _cases(device, small):
        print(f"\n{op}  [{shape}]")
        twin = None
        for name, fn in providers.items():
            if name == "triton" and device.type != "cuda":
                print(f"  {name:38s} needs a GPU (on CPU it runs only under TRITON_INTERPRET=1, for tests)")
                continue
            try:
                med, lo, hi = measure(fn, warmup=1, reps=args.reps)
            except (RuntimeError, NotImplementedError, ValueError) as e:
                print(f"  {name:38s} failed: {str(e).splitlines()[0][:80]}")
                continue
            twin = med if name == "torch" else twin
            rate = work / med / (1e12 if unit == "TFLOP/s" else 1e9)
            ratio = f"  x{twin / med:5.2f} vs twin" if twin and name != "torch" else ""
            print(f"  {name:38s} {med * 1e3:9.3f} ms  [{lo * 1e3:.3f}, {hi * 1e3:.3f}]  {rate:8.3f} {unit}{ratio}")
    print(load_line("after"))


if __name__ == "__main__":
    main()
