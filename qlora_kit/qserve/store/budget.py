"""Byte sizes for --cpu-adapter-budget: an integer with an optional unit, e.g. 1048576, 512MiB, 2GB, 64k.

Units are case-insensitive: B; k/KB = 1000, KiB = 1024; M/MB, MiB; G/GB, GiB; T/TB, TiB (a bare k/M/G/T is decimal,
as the SI prefixes). The value must be a whole number of bytes >= 1.
"""
import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_bytes(text: str, what: str = "cpu_adapter_budget") -> int:
    """Bytes in `text` (see the module docstring).

    Raises:
        ValueError naming `what`, the text and the accepted units.
    """
    m = _SIZE.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{what}={text!r}: expected a byte count with an optional unit "
                         "(B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), e.g. 512MiB")
    value = float(m.group(1)) * _UNITS[unit]
    if value != int(value) or value < 1:
        raise ValueError(f"{what}={text!r}: must be a whole number of bytes >= 1")
    return int(value)
