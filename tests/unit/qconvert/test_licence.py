"""qconvert/licence.py: the source's licence fields come from its card's front matter, else config.json; a card
that states none (or cannot be parsed) gives none; what publish reads back is only those string fields."""
import json

import pytest

from qlora_kit.qconvert.licence import LICENSE_KEY, recorded_license, source_license

pytestmark = pytest.mark.unit


def test_card_front_matter_wins_over_config(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: acme-1\nlicense_link: LICENSE\n"
                                        "language: [en]\n---\n# card\n")
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    assert source_license(tmp_path) == {"license": "other", "license_name": "acme-1", "license_link": "LICENSE"}


@pytest.mark.parametrize("card", [None, "no front matter", "---\nlicense: [unclosed\n---\n", "---\n- a list\n---\n"])
def test_config_is_the_fallback(tmp_path, card):
    if card is not None:
        (tmp_path / "README.md").write_text(card)
    (tmp_path / "config.json").write_text(json.dumps({"license": "apache-2.0"}))
    assert source_license(tmp_path) == {"license": "apache-2.0"}


def test_nothing_stated_is_empty(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"license": 3}))
    assert source_license(tmp_path) == {}


@pytest.mark.parametrize("value,want", [(json.dumps({"license": "mit", "x": "y", "license_name": 1}), {"license": "mit"}),
                                        ("not json", {}), ("[1]", {}), (None, {})])
def test_recorded_license_keeps_only_the_licence_strings(value, want):
    assert recorded_license({} if value is None else {LICENSE_KEY: value}) == want
