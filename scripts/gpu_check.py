"""GPU readiness in one run (< 5 min on an H100-class GPU): every kernel wrapper at real shapes against its torch twin
on CUDA, a CUDA-graph capture of a decode step, and the dequant / nf4_matmul timings against bitsandbytes and
dequant + cuBLAS. Prints one JSON table (a list of rows); exit status 1 if any check fails.

    python -m scripts.gpu_check [--out bench/results/gpu_check.json]

Run from the repository root (it reads tolerances from tests/tolerances.py). Needs a CUDA device.
"""
import argparse
import json
import sys
import time
import traceback

import torch

SHAPES = {"4096x4096": (4096, 4096), "14336x4096": (14336, 4096)}
BATCHES = (1, 16, 17, 512)
VOCAB = 128256


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = max(1.0, want.float().abs().max().item())
    return ((got.float() - want.float()).abs().max() / scale).item()


def _grads(fn, tensors, dy):
    leaves = [t.detach().requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.backward(dy)
    return [y] + [t.grad for t in leaves]


def _compare(rows, name, got, want, op, dtype):
    from tests.tolerances import TOLERANCES

    rtol, atol = TOLERANCES[(op, dtype)]
    worst = max(_rel(g, w) for g, w in zip(got, want))
    rows.append({"check": name, "dtype": str(dtype).removeprefix("torch."), "max_rel_err": worst,
                 "limit": rtol + atol, "ok": worst <= rtol + atol})


def check_kernels(rows):
    from qlora_kit.formats import quantize_4bit
    from qlora_kit.kernels import chunked_cross_entropy, dequant, lora, lora_multi, nf4_matmul, rmsnorm, rope, swiglu
    from qlora_kit.kernels.ref import dequant_ref

    dev = "cuda"
    for label, (n, k) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            packed = quantize_4bit((torch.randn(n, k, device=dev) * 0.02).to(dtype), "nf4", 64, True)
            same = torch.equal(dequant(packed, dtype), dequant_ref(packed, dtype))
            rows.append({"check": f"dequant {label} bit-exact", "dtype": str(dtype).removeprefix("torch."), "ok": same})
            for m in BATCHES:
                x, dy = torch.randn(m, k, device=dev).to(dtype), torch.randn(m, n, device=dev).to(dtype)
                _compare(rows, f"nf4_matmul {label} M={m} fwd+bwd",
                         _grads(lambda xx: nf4_matmul(xx, packed), (x,), dy),
                         _grads(lambda xx: nf4_matmul(xx, packed, backend="torch"), (x,), dy), "nf4_matmul", dtype)
            m, r = 512, 16
            t = [torch.randn(m, n, device=dev), torch.randn(m, k, device=dev), torch.randn(r, k, device=dev) / 64,
                 torch.randn(n, r, device=dev) / 4]
            t = [v.to(dtype) for v in t]
            dy = torch.randn(m, n, device=dev).to(dtype)
            _compare(rows, f"lora {label} r16 M=512 fwd+bwd", _grads(lambda *v: lora(*v, 2.0), t, dy),
                     _grads(lambda *v: lora(*v, 2.0, backend="torch"), t, dy), "lora", dtype)
            ranks = [8, 16, 64, 16]
            a = torch.cat([torch.randn(rr, k, device=dev) / 64 for rr in ranks]).to(dtype)
            b = torch.cat([torch.randn(n, rr, device=dev) / 4 for rr in ranks], dim=1).to(dtype)
            offs = torch.tensor([0] + ranks, device=dev).cumsum(0)
            scales = torch.tensor([2.0 / rr for rr in ranks], device=dev)
            for m in BATCHES:
                ids = torch.randint(-1, len(ranks), (m,), device=dev)
                t = [torch.randn(m, n, device=dev).to(dtype), torch.randn(m, k, device=dev).to(dtype), a, b]
                dy = torch.randn(m, n, device=dev).to(dtype)
                _compare(rows, f"lora_multi {label} 4 adapters M={m} fwd+bwd",
                         _grads(lambda bo, xx, aa, bb: lora_multi(bo, xx, ids, aa, bb, offs, scales), t, dy),
                         _grads(lambda bo, xx, aa, bb: lora_multi(bo, xx, ids, aa, bb, offs, scales, backend="torch"), t, dy),
                         "lora", dtype)
    for dtype in (torch.bfloat16, torch.float32):
        g, u, dy = (torch.randn(512, 14336, device=dev).to(dtype) for _ in range(3))
        _compare(rows, "swiglu 512x14336", _grads(swiglu, (g, u), dy), _grads(lambda *v: swiglu(*v, backend="torch"), (g, u), dy),
                 "swiglu", dtype)
        x, dy = torch.randn(1, 32, 2048, 128, device=dev).to(dtype), torch.randn(1, 32, 2048, 128, device=dev).to(dtype)
        cos, sin = torch.randn(2048, 128, device=dev).to(dtype), torch.randn(2048, 128, device=dev).to(dtype)
        _compare(rows, "rope 32x2048x128", _grads(lambda xx: rope(xx, cos, sin), (x,), dy),
                 _grads(lambda xx: rope(xx, cos, sin, backend="torch"), (x,), dy), "rope", dtype)
        x, w, dy = torch.randn(512, 4096, device=dev).to(dtype), torch.randn(4096, device=dev).to(dtype), torch.randn(512, 4096, device=dev).to(dtype)
        _compare(rows, "rmsnorm 512x4096", _grads(rmsnorm, (x, w), dy), _grads(lambda *v: rmsnorm(*v, backend="torch"), (x, w), dy),
                 "rmsnorm", dtype)
        h, head = torch.randn(512, 4096, device=dev).to(dtype), (torch.randn(VOCAB, 4096, device=dev) * 0.01).to(dtype)
        labels = torch.randint(0, VOCAB, (512,), device=dev)
        one = torch.tensor(1.0, device=dev)
        _compare(rows, f"cross_entropy vocab {VOCAB}", _grads(lambda hh: chunked_cross_entropy(hh, head, labels), (h,), one),
                 _grads(lambda hh: chunked_cross_entropy(hh, head, labels, backend="torch"), (h,), one), "cross_entropy", dtype)


def check_graph(rows):
    """Capture nf4_matmul + lora_multi at M = 16 (a decode step) in a CUDA graph and replay it on new inputs."""
    from qlora_kit.formats import quantize_4bit
    from qlora_kit.kernels import lora_multi, nf4_matmul

    dev, dtype, n, k = "cuda", torch.bfloat16, 4096, 4096
    packed = quantize_4bit((torch.randn(n, k, device=dev) * 0.02).to(dtype), "nf4", 64, True)
    ranks = [16, 8, 64]
    a = torch.cat([torch.randn(r, k, device=dev) / 64 for r in ranks]).to(dtype)
    b = torch.cat([torch.randn(n, r, device=dev) / 4 for r in ranks], dim=1).to(dtype)
    offs = torch.tensor([0] + ranks, device=dev).cumsum(0)
    scales = torch.tensor([2.0 / r for r in ranks], device=dev)
    x = torch.randn(16, k, device=dev).to(dtype)
    ids = torch.randint(-1, 3, (16,), device=dev)

    def step():
        return lora_multi(nf4_matmul(x, packed), x, ids, a, b, offs, scales)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.randint(-1, 3, (16,), device=dev))
    graph.replay()
    torch.cuda.synchronize()
    err = _rel(out, step())
    rows.append({"check": "CUDA graph: nf4_matmul + lora_multi decode step M=16, replay == eager", "max_rel_err": err, "ok": err == 0.0})


def time_kernels(rows):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import triton.testing

    from qlora_kit.formats import quantize_4bit, to_entries
    from qlora_kit.kernels import dequant, nf4_matmul

    def us(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3

    for label, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        packed = quantize_4bit(w, "nf4", 64, True)
        entries = to_entries("w", packed)
        qs = bnbf.QuantState.from_dict({kk[2:]: v for kk, v in entries.items() if kk != "w"}, torch.device("cuda"))
        moved = packed.nbytes + n * k * 2
        ours, bnb = us(lambda: dequant(packed)), us(lambda: bnbf.dequantize_4bit(entries["w"], qs))
        rows.append({"time": f"dequant {label} -> bf16", "ours_us": ours, "ours_GBps": moved / ours / 1e3,
                     "bnb_us": bnb, "bnb_GBps": moved / bnb / 1e3, "ok": True})
        for m in (1, 16, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wt = w.t()
            t = {"ours_us": us(lambda: nf4_matmul(x, packed)),
                 "bnb_us": us(lambda: bnb.matmul_4bit(x, entries["w"].t(), quant_state=qs)),
                 "dequant_cublas_us": us(lambda: x @ dequant(packed).t()), "bf16_cublas_us": us(lambda: x @ wt)}
            rows.append({"time": f"nf4_matmul {label} M={m}", **t, "ok": True})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON table to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps([{"check": "CUDA device", "ok": False, "error": "no CUDA device visible"}]))
        return 1
    rows = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ok": True}]
    t0 = time.time()
    for part in (check_kernels, check_graph, time_kernels):
        try:
            part(rows)
        except Exception as e:  # noqa: BLE001 - any failure is a row of the report, and exit 1
            rows.append({"check": part.__name__, "ok": False, "error": f"{type(e).__name__}: {e}",
                         "trace": traceback.format_exc()[-2000:]})
    rows.append({"seconds": round(time.time() - t0, 1), "ok": True})
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
