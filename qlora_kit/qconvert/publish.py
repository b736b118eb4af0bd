"""`qconvert publish`: verify a checkpoint, then create the Hub repo and upload it with a model card.

The upload is one commit (huggingface_hub.HfApi.create_commit) holding every file of the folder plus
the generated README.md, after create_repo (exist_ok) and, for a revision other than main,
create_branch. The endpoint is read from HF_ENDPOINT when publish runs.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.formats import read_header

from .convert import SOURCE_KEY
from .errors import PublishError, VerifyFailed
from .inspection import inspect_checkpoint
from .model_card import model_card
from .source import REPO_ID_PATTERN
from .options import DEFAULT_MIN_SQNR_DB
from .verify import check_integrity, compare

CARD = "README.md"


@dataclass
class PublishPlan:
    repo_id: str
    revision: str | None
    private: bool
    files: list[tuple[str, int]]  # (path in repo, bytes), README.md included
    card: str


def _base_model(folder: Path, given: str | None) -> str | None:
    """--base-model, else the source recorded by convert when it was a Hub repo id."""
    if given:
        return given
    shards = sorted(folder.glob("*.safetensors"))
    recorded = (read_header(shards[0]).get("__metadata__") or {}).get(SOURCE_KEY) if shards else None
    if recorded and REPO_ID_PATTERN.fullmatch(recorded) and "/" in recorded and not Path(recorded).exists():
        return recorded
    return None


def plan(path: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
         against: str | None = None, base_model: str | None = None,
         min_sqnr: float = DEFAULT_MIN_SQNR_DB) -> PublishPlan:
    """Verify PATH and build what would be uploaded. Raises VerifyFailed naming the first problem."""
    folder = Path(path)
    if not REPO_ID_PATTERN.fullmatch(repo_id) or "/" not in repo_id:
        raise PublishError(f"{repo_id!r}: not a Hub repo id; expected namespace/name")
    result = check_integrity(folder)
    if against:
        compare(folder, against, min_sqnr, result)
    if not result.ok:
        raise VerifyFailed(f"{folder}: {len(result.problems)} problem(s), nothing uploaded; first: {result.problems[0]}")
    card = model_card(repo_id, inspect_checkpoint(folder), result if against else None, _base_model(folder, base_model))
    files = [(p.name, p.stat().st_size) for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name != CARD]
    files.append((CARD, len(card.encode())))
    return PublishPlan(repo_id, revision, private, files, card)


def upload(folder: str | Path, p: PublishPlan, token: str | None = None) -> str:
    """Create the repo (and branch) and commit every planned file; return the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token, library_name="qlora-kit")
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name))
           for name, _ in p.files if name != CARD]
    ops.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=p.card.encode()))
    try:
        api.create_repo(p.repo_id, private=p.private, exist_ok=True)
        if p.revision and p.revision != "main":
            api.create_branch(p.repo_id, branch=p.revision, exist_ok=True)
        info = api.create_commit(p.repo_id, ops, commit_message="Upload 4-bit checkpoint (qlora-kit qconvert)",
                                 revision=p.revision)
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PublishError(f"{p.repo_id}: upload failed ({first})") from None
    return info.commit_url
