"""Every Triton kernel, every launch configuration its wrapper can choose, compiled ahead of time for sm_90 (H100/H200)
and sm_80 (A100) without a GPU (tests/unit/kernels/cuda_compile.py), with the limits a real GPU enforces:
shared memory within the device's opt-in limit, no register spills, IEEE (not TF32) dots where an operand is fp32,
tensor-core MMA where operands are 16-bit, no approximate division where the kernel promises exact rounding, and
128-bit global accesses on the data path of the element-wise kernels.

All cases compile once per session in one subprocess (TRITON_INTERPRET unset there), two processes wide.
"""
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration  # ~80 s of CPU (160 compiles): over the unit tier's 60 s budget
pytest.importorskip("triton")

KERNELS = ("nf4_matmul", "dequant", "lora[", "lora_shrink", "lora_expand", "swiglu", "rope", "rmsnorm", "cross_entropy", "adamw8bit")
SPILL_BUDGET = 0  # bytes of spill stores/loads allowed per kernel


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cuda_compile") / "cases.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-m", "tests.unit.kernels.cuda_compile", str(out), "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    by_kernel = defaultdict(list)
    for case in json.loads(out.read_text()):
        by_kernel[next(k for k in KERNELS if case["kernel"].startswith(k))].append(case)
    return by_kernel


def _problems(case: dict) -> list[str]:
    r, where = case["result"], f"{case['kernel']} sm_{case['cap']} {case['options']}"
    if "error" in r:
        return [f"{where}: does not compile: {r['error'][:500]}"]
    out = []
    if r["shared"] > case["shared_limit"]:
        out.append(f"{where}: needs {r['shared']} B shared memory, sm_{case['cap']} offers {case['shared_limit']} B")
    if max(r["spill_stores"], r["spill_loads"]) > SPILL_BUDGET:
        out.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads ({r['regs']} registers)")
    checks = case["checks"]
    if "ieee" in checks and r["tf32"]:
        out.append(f"{where}: an fp32 operand runs through TF32 (tf32 in the PTX)")
    if "tensor_core" in checks and not r["mma"]:
        out.append(f"{where}: 16-bit operands but no mma/wgmma in the PTX")
    if "exact_div" in checks and r["approx_div"]:
        out.append(f"{where}: approximate division/sqrt {r['approx_div']} where the twin rounds exactly")
    if "vec128_store" in checks and not r["all_store128"]:
        out.append(f"{where}: stores not all 128-bit: {sorted(set(r['stores']))}")
    if "vec128_load" in checks and not r["any_load128"]:
        out.append(f"{where}: the packed-byte load is not 128-bit: {sorted(set(r['loads']))[:6]}")
    if "vec128_all" in checks and not (r["all_load128"] and r["all_store128"]):
        out.append(f"{where}: loads/stores not all 128-bit: {sorted(set(r['loads'] + r['stores']))}")
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_config_fits_sm90_and_sm80(compiled, kernel):
    cases = compiled[kernel]
    assert {c["cap"] for c in cases} == {90, 80}, f"{kernel}: no cases for both targets"
    problems = [p for c in cases for p in _problems(c)]
    assert not problems, f"{len(problems)} of {len(cases)} {kernel} configs fail:\n" + "\n".join(problems)
