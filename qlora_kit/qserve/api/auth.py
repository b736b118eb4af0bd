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

from ..errors import Forbidden, Unauthorized


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
        """Read the key file. Raises ValueError naming the file and the bad entry."""
        if path is None:
            return cls(None)
        try:
            data = json.loads(open(path, encoding="utf-8").read())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the API key file ({e})") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list) or not keys:
            raise ValueError(f"{path}: needs a non-empty list under 'keys'")
        out = {}
        for i, k in enumerate(keys):
            key = k.get("key") if isinstance(k, dict) else None
            if not isinstance(key, str) or len(key) < 8:
                raise ValueError(f"{path}: keys[{i}].key must be a string of at least 8 characters")
            adapters = k.get("adapters", [])
            if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
                raise ValueError(f"{path}: keys[{i}].adapters must be a list of names or patterns")
            if _digest(key) in out:
                raise ValueError(f"{path}: keys[{i}] repeats an earlier key")
            out[_digest(key)] = Principal(str(k.get("tenant", f"key{i}")), tuple(adapters),
                                          bool(k.get("base", True)), bool(k.get("admin", False)))
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
