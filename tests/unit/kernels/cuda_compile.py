"""Ahead-of-time compilation of every Triton kernel launch configuration for sm_90 and sm_80, without a GPU.

`cases()` enumerates, per kernel, what its wrapper can launch: the dtypes x variants (nested / plain, forward /
backward, ...) x shape buckets, with tiles, warps and stages taken from the kernel file's own config function
(the one dispatch calls), so this checks what CUDA really runs. `compile_case()` compiles one case with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` and reports shared memory (metadata), registers
and spills (the `ptxas -v` log Triton prints with dump_ptxas_log) and facts read from the PTX.

Run as `python -m tests.unit.kernels.cuda_compile OUT.json` with TRITON_INTERPRET unset (the interpreter replaces
`@triton.jit` functions); tests/unit/kernels/test_compile_cuda.py does so in a subprocess and asserts on OUT.json.
"""
import contextlib
import importlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

from qlora_kit.kernels._device import A100, H100, Target

TARGETS = (H100, A100)
DT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
TL = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}  # tl dtype names for dtype constexprs (see compile_case)
# Shape buckets that pick configs: decode / small-batch M, Llama-8B widths (4096, 14336), head dims, vocab.
NF4_M = (1, 16, 17, 64)


def _case(kernel, module, fn, types, constexprs, options, target, checks, aligned=()):
    """One launch: `types` maps every runtime argument to a Triton type; `aligned` lists ints that are multiples of
    16 at real shapes (Triton specializes those, as it does 16-byte-aligned pointers)."""
    return {"kernel": kernel, "module": module, "fn": fn, "types": types, "constexprs": constexprs, "options": options,
            "cap": target.capability, "shared_limit": target.shared_bytes, "checks": list(checks), "aligned": list(aligned)}


def _nf4_matmul(target: Target):
    from qlora_kit.kernels.nf4_matmul import FUSED_MAX_M, _config

    for dt in ("bf16", "fp16"):  # fp32 never reaches the fused kernel (_fused routes it to dequant + cuBLAS)
        for nested in (True, False):
            for backward in (False, True):
                seen = set()
                for m in NF4_M:
                    assert m <= FUSED_MAX_M
                    cfg = _config(m, target)
                    key = tuple(sorted(cfg.items()))
                    if key not in seen:
                        seen.add(key)
                        tiles = {k: v for k, v in cfg.items() if k.isupper()}
                        opts = {k: v for k, v in cfg.items() if not k.isupper()}
                        types = {"a_ptr": DT[dt], "data_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
                                 "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
                                 "offset_ptr": "*fp32", "c_ptr": DT[dt], "M": "i32", "O": "i32", "R": "i32", "N": "i32", "K": "i32", "K_BYTES": "i32"}
                        yield _case(f"nf4_matmul[{dt},{'nested' if nested else 'plain'},{'bwd' if backward else 'fwd'},"
                                    f"m{tiles['BLOCK_M']},o{tiles['BLOCK_O']}]", "nf4_matmul", "_nf4_matmul_kernel", types,
                                    dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, NESTED=nested, BACKWARD=backward, FP32_DOT=False,
                                         **tiles), dict(opts, enable_fp_fusion=False), target, ("tensor_core",),
                                    aligned=("O", "R", "N", "K", "K_BYTES"))


def _dequant(target: Target):
    from qlora_kit.kernels.dequant import _config

    for dt in ("bf16", "fp16", "fp32"):
        for nested in (True, False):
            cfg = _config(64)
            types = {"data_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
                     "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": DT[dt], "n": "i32", "nbytes": "i32"}
            yield _case(f"dequant[{dt},{'nested' if nested else 'plain'}]", "dequant", "_dequant_kernel", types,
                        dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, NESTED=nested, BLOCK_BYTES=cfg["BLOCK_BYTES"], OUT_BF16=dt == "bf16"),
                        {"num_warps": cfg["num_warps"], "enable_fp_fusion": False}, target, ("vec128_store", "vec128_load"), aligned=("n", "nbytes"))


def _lora(target: Target):
    from qlora_kit.kernels.lora import _config

    for dt in ("bf16", "fp16", "fp32"):
        # _Lora's products: (a, b, c, add) = u = x A^T; base + s u B^T; g = s dy B (fp32); dA = g^T x; dB = s dy^T u (fp32);
        # dx = g A (g fp32)
        calls = {(dt, dt, dt, False), (dt, dt, dt, True), (dt, dt, "fp32", False), ("fp32", dt, dt, False)}
        for a, b, c, add in sorted(calls):
            types = {"a_ptr": DT[a], "b_ptr": DT[b], "add_ptr": DT[c], "c_ptr": DT[c], "M": "i32", "N": "i32", "R": "i32",
                     "stride_am": "i32", "stride_ar": "i32", "stride_bn": "i32", "stride_br": "i32", "scale": "fp32"}
            checks = ("ieee",) if "fp32" in (a, b) else ("tensor_core",)
            cfg = _config(True, "fp32" in (a, b))
            tiles = {k: v for k, v in cfg.items() if k.isupper()}
            opts = {k: v for k, v in cfg.items() if not k.isupper()}
            yield _case(f"lora[{a}x{b}->{c}{',add' if add else ''}]", "lora", "_lora_kernel", types,
                        dict(HAS_ADD=add, FP32_DOT=False, **tiles), opts, target, checks, aligned=("N", "R"))


def _lora_multi(target: Target):
    from qlora_kit.kernels.lora import _multi_config

    cfg = _multi_config()
    for dt in ("bf16", "fp16", "fp32"):
        shrink = {"x_ptr": DT[dt], "ids_ptr": "*i64", "a_ptr": DT[dt], "offsets_ptr": "*i64", "u_ptr": "*fp32", "K": "i32",
                  "R_TOTAL": "i32", "stride_ar": "i32", "stride_ak": "i32"}
        yield _case(f"lora_shrink[{dt}]", "lora", "_lora_shrink_kernel", shrink,
                    dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"]), {"num_warps": cfg["num_warps"]}, target, (), aligned=("K",))
        for has_base, scale in ((True, True), (False, False)):  # forward expand; backward dx = expand(G, A^T)
            expand = {"u_ptr": "*fp32", "ids_ptr": "*i64", "b_ptr": DT[dt], "offsets_ptr": "*i64", "scales_ptr": "*fp32",
                      "base_ptr": DT[dt], "y_ptr": DT[dt], "N": "i32", "R_TOTAL": "i32", "stride_bn": "i32", "stride_br": "i32"}
            yield _case(f"lora_expand[{dt}{',fwd' if has_base else ',dx'}]", "lora", "_lora_expand_kernel", expand,
                        dict(HAS_BASE=has_base, SCALE=scale, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"]),
                        {"num_warps": cfg["num_warps"]}, target, (), aligned=("N",))


def _elementwise(target: Target):
    from qlora_kit.kernels.adamw8bit import _config as adam_config
    from qlora_kit.kernels.cross_entropy import _config as ce_config
    from qlora_kit.kernels.rmsnorm import _launch_config as rms_config
    from qlora_kit.kernels.rope import _config as rope_config
    from qlora_kit.kernels.swiglu import _config as swiglu_config

    for dt in ("bf16", "fp16", "fp32"):
        sw = swiglu_config()
        opts = {"num_warps": sw["num_warps"]}
        yield _case(f"swiglu_fwd[{dt}]", "swiglu", "_swiglu_fwd_kernel", {"g_ptr": DT[dt], "u_ptr": DT[dt], "y_ptr": DT[dt], "n": "i32"},
                    {"BLOCK": sw["BLOCK"]}, opts, target, ("vec128_all",), aligned=("n",))
        yield _case(f"swiglu_bwd[{dt}]", "swiglu", "_swiglu_bwd_kernel",
                    {"g_ptr": DT[dt], "u_ptr": DT[dt], "dy_ptr": DT[dt], "dg_ptr": DT[dt], "du_ptr": DT[dt], "n": "i32"},
                    {"BLOCK": sw["BLOCK"]}, opts, target, ("vec128_all",), aligned=("n",))
        for d in (64, 128):
            rc = rope_config(d)
            for backward in (False, True):
                yield _case(f"rope[{dt},d{d},{'bwd' if backward else 'fwd'}]", "rope", "_rope_kernel",
                            {"x_ptr": DT[dt], "cos_ptr": DT[dt], "sin_ptr": DT[dt], "y_ptr": DT[dt], "rows": "i32", "H": "i32",
                             "S": "i32", "cos_batch_stride": "i32"},
                            dict(HALF=d // 2, BLOCK_R=rc["BLOCK_R"], BLOCK_H=rc["BLOCK_H"], BACKWARD=backward),
                            {"num_warps": rc["num_warps"]}, target, ("vec128_all",), aligned=("S", "cos_batch_stride"))
        for n in (2048, 8192):  # Llama-1B and Llama-70B hidden sizes (8B's 4096 lies between: same code, BLOCK_N/warps scale)
            rms = rms_config(n)
            opts = {"num_warps": rms["num_warps"]}
            yield _case(f"rmsnorm_fwd[{dt},n{n}]", "rmsnorm", "_rmsnorm_fwd_kernel",
                        {"x_ptr": DT[dt], "w_ptr": DT[dt], "y_ptr": DT[dt], "rstd_ptr": "*fp32", "N": "i32", "eps": "fp32"},
                        {"BLOCK_N": rms["BLOCK_N"]}, opts, target, (), aligned=("N",))
            yield _case(f"rmsnorm_bwd[{dt},n{n}]", "rmsnorm", "_rmsnorm_bwd_kernel",
                        {"x_ptr": DT[dt], "w_ptr": DT[dt], "dy_ptr": DT[dt], "rstd_ptr": "*fp32", "dx_ptr": DT[dt],
                         "dw_part_ptr": "*fp32", "M": "i32", "N": "i32"},
                        {"BLOCK_N": rms["BLOCK_N"]}, opts, target, (), aligned=("N",))
        ce = ce_config(128256)
        for grad in (False, True):
            yield _case(f"cross_entropy[{dt},{'grad' if grad else 'loss'}]", "cross_entropy", "_cross_entropy_kernel",
                        {"z_ptr": DT[dt], "labels_ptr": "*i64", "loss_ptr": "*fp32", "V": "i32", "ignore_index": "i32",
                         "inv_denom": "fp32"}, {"BLOCK_V": ce["BLOCK_V"], "WRITE_GRAD": grad}, {"num_warps": ce["num_warps"]},
                        target, (), aligned=("V",))
        yield _case(f"adamw8bit[{dt}]", "adamw8bit", "_adamw8bit_kernel",
                    {"p_ptr": DT[dt], "g_ptr": DT[dt], "q1_ptr": "*u8", "q2_ptr": "*u8", "a1_ptr": "*fp32", "a2_ptr": "*fp32",
                     "d1_ptr": "*fp32", "d2_ptr": "*fp32", "mid1_ptr": "*fp32", "mid2_ptr": "*fp32", "n": "i32", "beta1": "fp32",
                     "beta2": "fp32", "eps": "fp32", "decay": "fp32", "step_size": "fp32", "inv_bc2_sqrt": "fp32"},
                    {"BLOCKSIZE": 256}, dict(adam_config(256), enable_fp_fusion=False), target, ("exact_div",), aligned=("n",))
        yield _case(f"adamw8bit_multi[{dt}]", "adamw8bit", "_adamw8bit_multi_kernel",
                    {"addr_ptr": "*i64", "numel_ptr": "*i64", "owner_ptr": "*i32", "first_ptr": "*i32", "d1_ptr": "*fp32",
                     "d2_ptr": "*fp32", "mid1_ptr": "*fp32", "mid2_ptr": "*fp32", "beta1": "fp32", "beta2": "fp32",
                     "eps": "fp32", "decay": "fp32", "step_size": "fp32", "inv_bc2_sqrt": "fp32"},
                    {"P_DTYPE": TL[dt], "G_DTYPE": TL[dt], "BLOCKSIZE": 256}, dict(adam_config(256), enable_fp_fusion=False),
                    target, ("exact_div",))


def cases() -> list[dict]:
    """Every launch configuration of every kernel, for each of TARGETS."""
    out = []
    for target in TARGETS:
        for gen in (_nf4_matmul, _dequant, _lora, _lora_multi, _elementwise):
            out.extend(gen(target))
    return out


_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_LD = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global\S*", re.M)
_ST = re.compile(r"^\s*(?:@%p\d+\s+)?st\.global\S*", re.M)


def _is128(op: str) -> bool:
    return any(v in op for v in (".v4.b32", ".v4.u32", ".v4.f32", ".v4.s32", ".v2.b64", ".v2.u64", ".v2.f64"))


def compile_case(case: dict) -> dict:
    """Compile one case; returns its measurements (or the compiler's error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton.language as tl

    fn = getattr(importlib.import_module(f"qlora_kit.kernels.{case['module']}"), case["fn"])
    constexprs = {k: (tl.str_to_ty(v, None) if k.endswith("_DTYPE") else v) for k, v in case["constexprs"].items()}
    sig = {name: "constexpr" if name in case["constexprs"] else case["types"][name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name in case["aligned"]}
    knobs.nvidia.dump_ptxas_log = True  # the `ptxas -v` log (registers, spills) is printed only when ptxas runs:
    knobs.compilation.always_compile = True  # so bypass Triton's on-disk cache
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", case["cap"], 32),
                                options=case["options"])
    except Exception as e:  # noqa: BLE001 - a compiler failure is a result to report, whatever its class
        return {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    ptx = ck.asm["ptx"]
    spill = _SPILL.search(log.getvalue())
    loads, stores = _LD.findall(ptx), _ST.findall(ptx)
    return {
        "shared": ck.metadata.shared,
        "regs": int(_REGS.search(log.getvalue()).group(1)),
        "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2)),
        "tf32": "tf32" in ptx,
        "mma": "mma.sync" in ptx or "wgmma" in ptx,
        "approx_div": sorted(set(re.findall(r"\b(div\.full\.f32|div\.approx\.\w+|rcp\.approx\.\w+|sqrt\.approx\.\w+)", ptx))),
        "loads": [op.strip() for op in loads], "stores": [op.strip() for op in stores],
        "any_load128": any(_is128(op) for op in loads), "all_load128": bool(loads) and all(_is128(op) for op in loads),
        "any_store128": any(_is128(op) for op in stores), "all_store128": bool(stores) and all(_is128(op) for op in stores),
    }


def _run(case: dict) -> dict:
    return dict(case, result=compile_case(case))


def main(out_path: str, jobs: int = 2) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("cuda_compile: unset TRITON_INTERPRET; the interpreter has no compiler")
    with ProcessPoolExecutor(jobs) as pool:
        results = list(pool.map(_run, cases()))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
