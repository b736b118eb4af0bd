"""API keys: file parsing errors, 401 without/with a wrong key, tenant adapter patterns, admin rights."""
import json

import pytest

from qlora_kit.qserve.api.auth import KeyStore
from qlora_kit.qserve.api.errors import status_of
from qlora_kit.qserve.errors import AdapterNotFound, BodyTooLarge, Forbidden, PromptTooLong, QueueFull, Unauthorized

pytestmark = pytest.mark.unit


def _store(tmp_path, keys):
    p = tmp_path / "keys.json"
    p.write_text(json.dumps({"keys": keys}))
    return KeyStore.from_file(p)


def test_tenants_and_admin(tmp_path):
    ks = _store(tmp_path, [{"key": "sk-acme-123", "tenant": "acme", "adapters": ["acme-*"]},
                           {"key": "sk-admin-123", "admin": True}])
    with pytest.raises(Unauthorized, match="missing API key"):
        ks.authenticate(None)
    with pytest.raises(Unauthorized, match="invalid API key"):
        ks.authenticate("Bearer sk-nope-1234")
    acme = ks.authenticate("Bearer sk-acme-123")
    KeyStore.check_model(acme, "acme-1")
    KeyStore.check_model(acme, None)
    with pytest.raises(Forbidden, match="tenant 'acme' may not use adapter 'globex-1'"):
        KeyStore.check_model(acme, "globex-1")
    with pytest.raises(Forbidden, match="admin key"):
        KeyStore.check_admin(acme)
    KeyStore.check_admin(ks.authenticate("Bearer sk-admin-123"))


@pytest.mark.parametrize("keys,msg", [([], "non-empty"), ([{"key": "short"}], "at least 8"),
                                      ([{"key": "sk-123456", "adapters": "x"}], "list of names"),
                                      ([{"key": "sk-123456"}, {"key": "sk-123456"}], "repeats")])
def test_bad_key_files(tmp_path, keys, msg):
    with pytest.raises(ValueError, match=msg):
        _store(tmp_path, keys)


def test_no_file_means_open():
    assert KeyStore.from_file(None).authenticate(None).admin


def test_status_map():
    assert [status_of(e("x"))[0] for e in (Unauthorized, Forbidden, AdapterNotFound, PromptTooLong, BodyTooLarge,
                                           QueueFull)] == [401, 403, 404, 413, 413, 429]
