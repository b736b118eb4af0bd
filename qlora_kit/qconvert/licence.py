"""The source model's licence, carried into a converted checkpoint and its model card.

Convert reads the licence fields (license, license_name, license_link) from the source card's YAML front
matter (README.md), else config.json's `license`, and records them as JSON in the safetensors metadata key
`qlora_kit.source_license`; publish reads them back into the card. The licence/notice files themselves are
copied by convert (qlora_kit._cli.hub.license_files).
"""
import json
from pathlib import Path

from qlora_kit.formats import read_json_object

LICENSE_KEY = "qlora_kit.source_license"  # safetensors metadata: JSON of the source's licence fields
LICENSE_FIELDS = ("license", "license_name", "license_link")
_MAX_LICENSE_CHARS = 512


def source_license(folder: Path) -> dict[str, str]:
    """The licence fields of a source checkpoint: README.md front matter first, else config.json's `license`.

    Only string values are kept (each cut to 512 characters); {} when the source states none.
    """
    fields: dict = {}
    card = folder / "README.md"
    if card.is_file():
        import yaml
        from huggingface_hub.repocard import metadata_load

        try:
            fields = metadata_load(card) or {}
        except (yaml.YAMLError, ValueError, OSError):  # a malformed card states no licence we could copy
            fields = {}
        fields = fields if isinstance(fields, dict) else {}
    if "license" not in fields and (folder / "config.json").is_file():
        fields = {"license": read_json_object(folder / "config.json").get("license")}
    return {k: str(fields[k])[:_MAX_LICENSE_CHARS] for k in LICENSE_FIELDS if isinstance(fields.get(k), str)}


def recorded_license(metadata: dict[str, str]) -> dict[str, str]:
    """The licence fields convert recorded in a checkpoint's safetensors metadata ({} when none)."""
    try:
        fields = json.loads(metadata.get(LICENSE_KEY) or "{}")
    except ValueError:
        return {}
    if not isinstance(fields, dict):
        return {}
    return {k: v for k, v in fields.items() if k in LICENSE_FIELDS and isinstance(v, str)}
