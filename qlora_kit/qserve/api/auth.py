"""API keys from a JSON file; each key names the adapters (tenants) it may call; admin keys manage adapters.

    {"keys": [
        {"key": "sk-acme-1", "tenant": "acme", "adapters": ["acme/*"], "base": true},
        {"key": "sk-ops",    "tenant": "ops",  "admin": true}
    ]}

`adapters` holds names or shell-style patterns (fnmatch); `base` (default true) allows the base model;
an admin key may call everything and load/unload adapters. Keys arrive as `Authorization: Bearer <key>`
(the OpenAI client's way). Keys are kept only as SHA-256 digests in memory.
"""
import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass

from ..errors import Forbidden, KeyFileError, Unauthorized

# field -> (JSON type, meaning); every entry needs `key`
_FIELDS = {"key": (str, "the bearer token"), "tenant": (str, "name shown in errors"),
           "adapters": (list, "adapter names or patterns"), "base": (bool, "may call the base model"),
           "admin": (bool, "may call everything and manage adapters")}
_KIND_NAMES = {str: "a string", list: "a list of strings", bool: "true or false (a JSON boolean)"}


def _is(value, kind) -> bool:
    if kind is list:
        return isinstance(value, list) and all(isinstance(a, str) and a for a in value)
    return type(value) is kind


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: tenant name, adapter patterns, base-model access, admin rights."""

    tenant: str
    adapters: tuple[str, ...] = ()
    base: bool = True
    admin: bool = False

    def may_use(self, adapter: str | None) -> bool:
        if self.admin:
            return True
        if adapter is None:
            return self.base
        return any(fnmatch.fnmatchcase(adapter, p) for p in self.adapters)


OPEN = Principal("anonymous", ("*",), True, True)  # no key file: everything allowed


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Authenticates bearer tokens against the key file; `None` file = authentication off."""

    def __init__(self, entries: dict[str, Principal] | None):
        self._by_digest = entries

    @classmethod
    def from_file(cls, path: str | os.PathLike | None) -> "KeyStore":
        """Read the key file strictly: booleans are JSON booleans, unknown fields are refused.

        Raises:
            KeyFileError (a ValueError) naming the file and the bad entry or field.
        """
        if path is None:
            return cls(None)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, RecursionError, ValueError) as e:
            raise KeyFileError(f"{path}: cannot read the API key file ({e})") from None
        if not isinstance(data, dict) or set(data) != {"keys"}:
            raise KeyFileError(f"{path}: must be a JSON object with exactly one field, 'keys'")
        keys = data["keys"]
        if not isinstance(keys, list) or not keys:
            raise KeyFileError(f"{path}: needs a non-empty list under 'keys'")
        out = {}
        for i, k in enumerate(keys):
            where = f"{path}: keys[{i}]"
            if not isinstance(k, dict):
                raise KeyFileError(f"{where}: must be an object with fields {sorted(_FIELDS)}")
            unknown = sorted(set(k) - set(_FIELDS))
            if unknown:
                raise KeyFileError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
            for field, (kind, _) in _FIELDS.items():
                if field in k and not _is(k[field], kind):
                    raise KeyFileError(f"{where}.{field}={k[field]!r}: must be {_KIND_NAMES[kind]}")
            key = k.get("key")
            if key is None or len(key) < 8:
                raise KeyFileError(f"{where}.key must be a string of at least 8 characters")
            if _digest(key) in out:
                raise KeyFileError(f"{where} repeats an earlier key")
            out[_digest(key)] = Principal(k.get("tenant", f"key{i}"), tuple(k.get("adapters", ())),
                                          k.get("base", True), k.get("admin", False))
        return cls(out)

    @property
    def enabled(self) -> bool:
        return self._by_digest is not None

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller for an Authorization header. Raises Unauthorized."""
        if self._by_digest is None:
            return OPEN
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        who = self._by_digest.get(_digest(authorization[7:].strip()))
        if who is None:
            raise Unauthorized("invalid API key")
        return who

    @staticmethod
    def check_model(who: Principal, adapter: str | None) -> None:
        """Raises Forbidden if `who` may not call `adapter` (None = base)."""
        if not who.may_use(adapter):
            what = "the base model" if adapter is None else f"adapter {adapter!r}"
            raise Forbidden(f"tenant {who.tenant!r} may not use {what}")

    @staticmethod
    def check_admin(who: Principal) -> None:
        if not who.admin:
            raise Forbidden(f"tenant {who.tenant!r}: loading and unloading adapters needs an admin key")

    @staticmethod
    def check_metrics(who: Principal) -> None:
        """/metrics is for operators when keys are on: its counters would let a tenant watch other tenants."""
        if not who.admin:
            raise Forbidden(f"tenant {who.tenant!r}: reading /metrics needs an admin key")
