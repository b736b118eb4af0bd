"""`qconvert publish`: verify a checkpoint, then create the Hub repo and upload it with a model card.

A folder smaller than the large-folder threshold (default 5 GB, `--large-folder-threshold`) is one commit
(huggingface_hub.HfApi.create_commit) holding every file of the folder plus the generated README.md,
after create_repo (exist_ok) and, for a revision other than main, create_branch. A larger folder goes
through huggingface_hub's resumable large-folder upload: HfApi.upload_large_folder where the installed
huggingface_hub has it (0.25 to 1.x), else HfApi.upload_folder, which from huggingface_hub 2.0 is itself the
resumable multi-commit pipeline (rerun the same command to resume). Both read files from the folder, so the
card is first written to PATH/README.md. The endpoint is read from HF_ENDPOINT when publish runs.
"""
from dataclasses import dataclass
from pathlib import Path

from qlora_kit._cli.hub import REPO_ID_PATTERN, commit_files, ensure_repo, hub_api, license_files
from qlora_kit.formats import atomic_file, read_header, spec

from .errors import PublishError, VerifyFailed
from .inspection import inspect_checkpoint
from .licence import recorded_license
from .model_card import model_card
from .options import DEFAULT_MIN_SQNR_DB
from .verify import check_integrity, compare

CARD = "README.md"
LARGE_FOLDER_BYTES = 5 * 10**9  # above this, the resumable large-folder upload


@dataclass
class PublishPlan:
    repo_id: str
    revision: str | None
    private: bool
    files: list[tuple[str, int]]  # (path in repo, bytes), README.md included
    card: str
    licenses: list[str]  # licence/notice files among `files`

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def _metadata(folder: Path) -> dict[str, str]:
    shards = sorted(folder.glob("*.safetensors"))
    return (read_header(shards[0]).get("__metadata__") or {}) if shards else {}


def _base_model(metadata: dict[str, str], given: str | None) -> str | None:
    """--base-model, else the source recorded by convert when it was a Hub repo id."""
    if given:
        return given
    recorded = metadata.get(spec.SOURCE_KEY)
    if recorded and REPO_ID_PATTERN.fullmatch(recorded) and "/" in recorded and not Path(recorded).exists():
        return recorded
    return None


def plan(path: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
         against: str | None = None, base_model: str | None = None,
         min_sqnr: float = DEFAULT_MIN_SQNR_DB, quantized_by: str | None = None) -> PublishPlan:
    """Verify PATH and build what would be uploaded. Raises VerifyFailed naming the first problem."""
    folder = Path(path)
    if not REPO_ID_PATTERN.fullmatch(repo_id) or "/" not in repo_id:
        raise PublishError(f"{repo_id!r}: not a Hub repo id; expected namespace/name")
    result = check_integrity(folder)
    if against:
        compare(folder, against, min_sqnr, result)
    if not result.ok:
        raise VerifyFailed(f"{folder}: {len(result.problems)} problem(s), nothing uploaded; first: {result.problems[0]}")
    meta = _metadata(folder)
    card = model_card(repo_id, inspect_checkpoint(folder), result if against else None, _base_model(meta, base_model),
                      recorded_license(meta), quantized_by)
    files = [(p.name, p.stat().st_size) for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name != CARD]
    files.append((CARD, len(card.encode())))
    return PublishPlan(repo_id, revision, private, files, card, [p.name for p in license_files(folder)])


def upload(folder: str | Path, p: PublishPlan, token: str | None = None,
           large_folder_bytes: int = LARGE_FOLDER_BYTES) -> str:
    """Create the repo (and branch) and upload every planned file; return the commit (or repo) URL."""
    from huggingface_hub.errors import HfHubHTTPError

    api = hub_api(token)
    message = "Upload 4-bit checkpoint (qlora-kit qconvert)"
    try:
        if p.total_bytes > large_folder_bytes:
            return _upload_large(api, Path(folder), p, message)
        return commit_files(api, p.repo_id, p.private, p.revision, Path(folder), [n for n, _ in p.files if n != CARD],
                            {CARD: p.card.encode()}, message)
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PublishError(f"{p.repo_id}: upload failed ({first})") from None


def _upload_large(api, folder: Path, p: PublishPlan, message: str) -> str:
    """The resumable upload of a big folder (the card written into it first)."""
    with atomic_file(folder / CARD) as tmp:
        tmp.write_text(p.card)
    names = [name for name, _ in p.files]
    large = getattr(api, "upload_large_folder", None)
    if large is not None:  # huggingface_hub 0.25 - 1.x
        large(repo_id=p.repo_id, folder_path=folder, repo_type="model", revision=p.revision, private=p.private,
              allow_patterns=names)
        return f"{api.endpoint}/{p.repo_id}"
    ensure_repo(api, p.repo_id, p.private, p.revision)
    info = api.upload_folder(repo_id=p.repo_id, folder_path=folder, revision=p.revision, allow_patterns=names,
                             commit_message=message)
    return info.commit_url
