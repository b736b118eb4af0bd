"""Every numeric tolerance of the test suite, keyed by (op, dtype). Tests look them up here."""
import torch

# (rtol, atol). "exact" ops compare with torch.equal and are listed for completeness.
TOLERANCES = {
    ("dequant", torch.float32): (0.0, 0.0),
    ("dequant", torch.float16): (0.0, 0.0),
    ("dequant", torch.bfloat16): (0.0, 0.0),
    # bitsandbytes' CPU double quantization picks the 8-bit code through a lookup table that is
    # off by one code step for ~0.1% of blocks; one step of the dynamic map near 1.0 is 1/64 of s_m.
    ("dq_absmax_vs_bnb", torch.float32): (0.0, 1.0 / 64),
    # SQNR of our round trip vs bitsandbytes' on the same weight, in dB.
    ("sqnr_db", torch.float32): (0.0, 0.02),
}


def tol(op: str, dtype: torch.dtype = torch.float32) -> dict:
    rtol, atol = TOLERANCES[(op, dtype)]
    return {"rtol": rtol, "atol": atol}
