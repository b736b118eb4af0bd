"""The one place a checkpoint argument becomes a local folder: a folder is used as is, a Hub repo id
(`org/name`) is fetched with huggingface_hub's `snapshot_download` into (or read from) the Hugging Face
cache. HF_HUB_OFFLINE=1 is honoured: the cached snapshot is used and nothing is requested; a repo that is
not cached is a one-line error saying so. Used by `qconvert convert/verify --against`, `qtrain train /
train-many / ask --base` and `qserve serve CKPT`. The upload helpers shared by `qconvert publish` and
`qtrain publish` live here too, and aux_files: what travels beside a checkpoint's weights.

Only the files a checkpoint needs are fetched: weights (safetensors; PyTorch .bin only when the repo has no
safetensors), configs, tokenizer and chat template, the model card (README.md, whose front matter carries the licence) and the licence/notice files a republished model
must carry (LICENSE*, LICENCE*, NOTICE*, USE_POLICY*, COPYING*, any letter case).
"""
import os
import re
from pathlib import Path

from qlora_kit.formats.errors import QloraKitError

REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
LICENSE_STEMS = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY", "COPYING")
MAX_LICENSE_FILES = 16  # bound on the licence/notice files carried (a model has a handful)
MAX_LICENSE_BYTES = 4 * 2**20  # bound on each one (the Llama 3 licence is ~8 KB)
# Copied beside the weights by convert, dequantize and merge (aux_files): every file with these suffixes but the
# weight indexes, which each writer makes anew.
_AUX_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")


def _any_case(stem: str) -> str:
    """An fnmatch pattern matching `stem*` in any letter case (fnmatch is case-sensitive on POSIX)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in stem) + "*"


LICENSE_PATTERNS = [_any_case(s) for s in LICENSE_STEMS]
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.jinja", "*.model", "*.txt", "*.tiktoken", "README.md",
                *LICENSE_PATTERNS]


class CheckpointNotFound(QloraKitError):
    """A checkpoint argument is neither an existing folder nor a Hub repo that can be fetched (or is cached)."""


def is_hub_id(src: str) -> bool:
    """True when SRC reads as `org/name` (or `name`) and is not a local path."""
    if Path(src).expanduser().exists() or src.startswith((".", "/", "~")):
        return False
    return bool(REPO_ID_PATTERN.fullmatch(src)) and os.sep not in src.replace("/", "", 1)


def resolve_checkpoint(src: str | os.PathLike, revision: str | None = None, token: str | None = None,
                       patterns: list[str] | None = None) -> Path:
    """SRC as a local folder: the folder itself, or the Hub repo's snapshot in the HF cache.

    Args:
        src: a folder, or a Hub repo id such as `HuggingFaceTB/SmolLM2-135M-Instruct`.
        revision: branch, tag or commit of a Hub repo (default main).
        token: Hub token (default: $HF_TOKEN or the saved login).
        patterns: files to fetch (default HUB_PATTERNS).

    Raises:
        CheckpointNotFound: a file, a missing folder, or a repo that cannot be fetched (offline: not cached).
    """
    src = os.fspath(src)
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFound(f"{src}: is a file; expected a checkpoint folder or a Hub repo id")
    if not is_hub_id(src):
        raise CheckpointNotFound(f"{src}: no such folder (and not a Hub repo id such as org/name)")
    return fetch_snapshot(src, revision, token, patterns)


def fetch_snapshot(repo_id: str, revision: str | None = None, token: str | None = None,
                   patterns: list[str] | None = None) -> Path:
    """The Hub repo's snapshot folder in the HF cache, fetching `patterns` (default HUB_PATTERNS) first unless
    HF_HUB_OFFLINE=1 (then only the cache is read). REPO_ID is never taken as a local path (qserve's adapter
    source calls this directly with names from requests).

    Raises:
        CheckpointNotFound: a repo that cannot be fetched (offline: not cached), in one line.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    src, patterns = repo_id, patterns or HUB_PATTERNS
    try:
        # safetensors first: many repos hold both formats, and the .bin copy would double the download
        folder = Path(snapshot_download(src, revision=revision, token=token,
                                        allow_patterns=[p for p in patterns if p != "*.bin"]))
        if "*.bin" in patterns and not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(src, revision=revision, token=token, allow_patterns=patterns))
        return folder
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as e:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointNotFound(f"{src}: not a local folder, and HF_HUB_OFFLINE=1 but it is not in the Hugging "
                                     f"Face cache ({constants.HF_HUB_CACHE}"
                                     f"{', revision ' + revision if revision else ''}); fetch it once online "
                                     "or give a folder") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointNotFound(f"{src}: not a local folder and could not be fetched from the Hub ({first})") from None


def license_files(folder: Path) -> list[Path]:
    """The licence/notice files at the top of FOLDER (LICENSE*, LICENCE*, NOTICE*, USE_POLICY*, COPYING*, any
    case), sorted by name.

    Raises:
        CheckpointNotFound: more than MAX_LICENSE_FILES of them, or one larger than MAX_LICENSE_BYTES (not a
            licence: refused rather than copied or dropped silently).
    """
    found = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.name.upper().startswith(LICENSE_STEMS) and not p.name.startswith("."))
    if len(found) > MAX_LICENSE_FILES:
        raise CheckpointNotFound(f"{folder}: {len(found)} licence/notice files (at most {MAX_LICENSE_FILES} are "
                                 "carried)")
    for p in found:
        if p.stat().st_size > MAX_LICENSE_BYTES:
            raise CheckpointNotFound(f"{p}: {p.stat().st_size:,} bytes is too large for a licence/notice file "
                                     f"(at most {MAX_LICENSE_BYTES:,})")
    return found


def aux_files(folder: Path) -> list[str]:
    """What is copied beside the weights: config, generation config, tokenizer files, chat template and every
    licence/notice file (license_files)."""
    from qlora_kit.formats.shards import INDEX  # imported here: formats/ loads torch, which hub.py does not need

    names = {p.name for p in license_files(folder)}
    for p in sorted(folder.iterdir()):
        if (p.is_file() and not p.name.startswith(".") and p.suffix in _AUX_SUFFIXES
                and p.name not in (INDEX, "pytorch_model.bin.index.json")):
            names.add(p.name)
    return sorted(names)


def hub_api(token: str | None = None):
    """An HfApi on HF_ENDPOINT (read when called; the public Hub when unset)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token, library_name="qlora-kit")


def ensure_repo(api, repo_id: str, private: bool, revision: str | None) -> None:
    """create_repo (exist_ok) and, for a revision other than main, create_branch (exist_ok)."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)


def commit_files(api, repo_id: str, private: bool, revision: str | None, folder: Path, names: list[str],
                 extra: dict[str, bytes], message: str) -> str:
    """ensure_repo, then one create_commit of folder/<names> plus the `extra` contents; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
    ops += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in extra.items()]
    ensure_repo(api, repo_id, private, revision)
    return api.create_commit(repo_id, ops, commit_message=message, revision=revision).commit_url
