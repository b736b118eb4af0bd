"""Where --data / --eval-data rows come from: a JSONL file (read here, line by line), or, through the optional
`datasets` library (the `data` extra), a local parquet / JSON / CSV file, a local dataset folder, or a Hugging
Face Hub dataset id.

A `.jsonl` file, and a `.json` file whose first character is "{" (JSON Lines), are read without `datasets`, so their
errors name the line. Everything else goes through `datasets.load_dataset` and its errors name the row (1-based).
Hub ids honour the Hugging Face cache and offline mode (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1): offline, an id
loads only if it is already cached. Dataset scripts never run (datasets >= 3 does not run them).
"""
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError

try:
    import datasets

    HAS_DATASETS = True
except ImportError:
    HAS_DATASETS = False

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?")
MAX_LINE_BYTES = 64 << 20  # one JSONL line; a longer one is refused before it is parsed


def rows(spec: str, split: str = "train", config: str = "") -> Iterator[tuple[str, object]]:
    """Yield (where, row) for every row of `spec`; `where` names the file and line (or row) for error messages.

    Args:
        spec: a file path, a dataset folder, or a Hub dataset id ("owner/name").
        split: the split of a folder or Hub id (a single local file is always its own "train" split).
        config: the dataset configuration name of a Hub id ("" = its default).

    Raises:
        DataError: missing file, bad JSON line, `datasets` not installed, or a dataset it cannot load.
    """
    path = Path(spec)
    if path.is_file() and _is_json_lines(path):
        yield from _jsonl_rows(path)
        return
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"{path}: unknown dataset file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
        args, kwargs = (BUILDERS[path.suffix.lower()],), {"data_files": str(path), "split": "train"}
    elif path.is_dir():
        args, kwargs = (str(path),), {"split": split}
    elif path.suffix.lower() in BUILDERS or not HUB_ID.fullmatch(str(spec)):
        raise DataError(f"{spec}: dataset file not found (nor a Hub dataset id like owner/name)")
    else:
        args, kwargs = (str(spec),), {"split": split, **({"name": config} if config else {})}
    ds = _load(spec, args, kwargs)
    for i, row in enumerate(ds, 1):
        yield f"{spec} row {i}", row


def _load(spec: str, args: tuple, kwargs: dict):
    if not HAS_DATASETS:
        raise DataError(f"{spec}: reading parquet, CSV, JSON arrays, dataset folders and Hub datasets needs the "
                        "`datasets` library: pip install 'qlora-kit[data]' (JSONL files need nothing)")
    offline = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetNotFoundError) as e:
        hint = " (offline mode is on: the dataset must already be in the Hugging Face cache)" if offline else ""
        first = " ".join(str(e).split())[:300]
        raise DataError(f"{spec}: cannot load the dataset{hint}: {type(e).__name__}: {first}") from None


def _is_json_lines(path: Path) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"{"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            where = f"{path}:{n}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
            except ValueError as e:  # e.g. an integer over Python's digit limit
                raise DataError(f"{where}: not valid JSON ({e})") from None
            yield where, rec
