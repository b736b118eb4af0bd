"""Compile the CPU kernels (kernels/cpu/nf4.c, lora.c) once per machine into one library and load it with ctypes.

The shared library is built with the system C compiler (`$CC`, else cc or gcc) at first use, for this CPU
(-march=native), with -ffp-contract=off so every product and sum is a separately rounded IEEE fp32 operation
(the kernels then equal the torch twins bit for bit). It is cached in `$QLORA_KIT_CACHE` (default
~/.cache/qlora_kit) under a name hashed from the source, the flags and the CPU's feature list, written to a
temporary file and renamed, so concurrent processes (torchrun ranks) never load a half-written library.
Without a compiler the CPU kernels run their torch twins, and one line on stderr says so.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = [HERE / "nf4.c", HERE / "lora.c"]
HEADERS = [HERE / "qk_common.h"]
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "qk_dequant": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _C, _I, _I],
    "qk_gemm": [_P, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _I, _C, _I, _I, _P],
    "qk_lora_rows_group": [_P, _C, _I, _P, _I, _P, _P, _C, _P, _P, _P, _P, _P, _C, _I, _I],
    "qk_gemm16": [_P, _I, _P, _I, _P, _I, _C, _I, _I, _P],
    "qk_simd": [],
}


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    root = os.environ.get("QLORA_KIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qlora_kit")
    return Path(root)


def _build(cc: str) -> Path:
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS) + " ".join(FLAGS).encode() + _cpu_features().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    out = cache_dir() / f"qk-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@cache
def library() -> ctypes.CDLL | None:
    """The compiled CPU kernels, or None (after one line on stderr) when they cannot be built here.

    QLORA_KIT_CPU_KERNELS=0 turns them off (the torch twins run), also with one line saying so.
    """
    if os.environ.get("QLORA_KIT_CPU_KERNELS", "1") == "0":
        print("qlora-kit: QLORA_KIT_CPU_KERNELS=0: 4-bit CPU kernels run the torch twins (slower)", file=sys.stderr)
        return None
    cc = _compiler()
    if cc is None:
        print("qlora-kit: no C compiler (cc, gcc or clang; $CC): 4-bit CPU kernels run the torch twins (slower)",
              file=sys.stderr)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        print(f"qlora-kit: building the CPU kernels with {cc} failed ({detail.strip().splitlines()[-1:]}): "
              "4-bit CPU kernels run the torch twins (slower)", file=sys.stderr)
        return None
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
    lib.qk_simd.restype = ctypes.c_int
    lib.qk_lora_rows_group.restype = ctypes.c_int
    return lib
