"""API keys: file parsing errors, 401 without/with a wrong key, tenant adapter patterns, admin rights."""
import json

import pytest

from qlora_kit.qserve.api.auth import KeyStore
from qlora_kit.qserve.api.errors import status_of
from qlora_kit.qserve.errors import (
    AdapterNotFound,
    BodyTooLarge,
    Forbidden,
    KeyFileError,
    PromptTooLong,
    QueueFull,
    Unauthorized,
)

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
                                      ([{"key": "sk-123456", "adapters": "x"}], "adapters='x': must be a list of strings"),
                                      ([{"key": "sk-123456"}, {"key": "sk-123456"}], "repeats")])
def test_bad_key_files(tmp_path, keys, msg):
    with pytest.raises(ValueError, match=msg):
        _store(tmp_path, keys)


def test_no_file_means_open():
    assert KeyStore.from_file(None).authenticate(None).admin


def test_status_map():
    assert [status_of(e("x"))[0] for e in (Unauthorized, Forbidden, AdapterNotFound, PromptTooLong, BodyTooLarge,
                                           QueueFull)] == [401, 403, 404, 413, 413, 429]


@pytest.mark.parametrize("keys,msg", [  # issue 13 item 2: the key file is read strictly
    ([{"key": "sk-123456", "admin": "false"}], "keys[0].admin='false': must be true or false (a JSON boolean)"),
    ([{"key": "sk-123456", "base": "false"}], "keys[0].base='false': must be true or false (a JSON boolean)"),
    ([{"key": "sk-123456", "admin": 1}], "keys[0].admin=1: must be true or false"),
    ([{"key": "sk-123456", "tenant": 5}], "keys[0].tenant=5: must be a string"),
    ([{"key": "sk-123456", "is_admin": True}], "keys[0]: unknown field(s) ['is_admin']"),
    (["sk-123456"], "keys[0]: must be an object"),
    ([{"key": 12345678901}], "keys[0].key=12345678901: must be a string"),
])
def test_key_file_is_strict(tmp_path, keys, msg):
    with pytest.raises(KeyFileError) as e:
        _store(tmp_path, keys)
    assert str(e.value).startswith(str(tmp_path / "keys.json"))
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("text,msg", [('{"keys": [], "admin": true}', "exactly one field, 'keys'"),
                                      ("[1]", "exactly one field"), ("\xff", "cannot read"),
                                      ("[" * 100000, "cannot read")])
def test_key_file_not_an_object(tmp_path, text, msg):
    p = tmp_path / "keys.json"
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(KeyFileError, match=msg):
        KeyStore.from_file(p)
