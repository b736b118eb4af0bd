"""trainer/sources.py: --data as parquet / CSV / JSON-array files through `datasets` (the data extra): the same
rows give the same examples as the committed JSONL samples. A Hub dataset id offline: tests/integration/
test_qtrain_hub_data.py."""
import json
from pathlib import Path

import pytest

from qlora_kit.trainer import sources
from qlora_kit.trainer.data import load_examples
from qlora_kit.trainer.errors import DataError

pytestmark = pytest.mark.unit

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "formats"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / f"{name}.jsonl").read_text().splitlines()]


def _same(a, b):
    return [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]


@pytest.mark.parametrize("name, kind", [("messages_trl", "parquet"), ("prompt_completion_chat", "parquet"),
                                        ("sharegpt", "json"), ("content_parts", "json"),
                                        ("prompt_completion", "csv"), ("text", "csv")])
def test_parquet_json_csv_give_the_jsonl_examples(tiny_tok, tmp_path, name, kind):
    import datasets

    ds = datasets.Dataset.from_list(_rows(name))
    path = tmp_path / f"{name}.{kind}"
    if kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    else:
        ds.to_json(str(path), lines=False)  # a JSON array: read through datasets, not line by line
        assert path.read_text().lstrip().startswith("[")
    assert _same(load_examples(path, tiny_tok, 256), load_examples(SAMPLES / f"{name}.jsonl", tiny_tok, 256))


def test_bad_parquet_row_names_file_row_and_field(tiny_tok, tmp_path):
    import datasets

    rows = _rows("messages_trl")
    rows[2]["messages"][1]["role"] = "robot"
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=r"bad.parquet row 3: field messages\[1\].role: must be one of"):
        load_examples(path, tiny_tok, 256)


def test_missing_file_and_missing_extra_are_one_line_errors(tiny_tok, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="nope.parquet: dataset file not found"):
        load_examples(tmp_path / "nope.parquet", tiny_tok, 256)
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n")
    monkeypatch.setattr(sources, "HAS_DATASETS", False)  # as if the data extra were not installed
    with pytest.raises(DataError, match=r"d.csv: reading parquet, CSV.*needs the `datasets` library: "
                                        r"pip install 'qlora-kit\[data\]'"):
        load_examples(path, tiny_tok, 256)
    assert len(load_examples(SAMPLES / "text.jsonl", tiny_tok, 256)) == 4  # JSONL needs nothing


def test_dataset_folder_with_splits(tiny_tok, tmp_path):
    import datasets

    rows = _rows("messages_trl")
    (tmp_path / "ds" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[3:]).to_parquet(str(tmp_path / "ds" / "data" / "test-00000-of-00001.parquet"))
    jsonl = load_examples(SAMPLES / "messages_trl.jsonl", tiny_tok, 256)
    assert _same(load_examples(tmp_path / "ds", tiny_tok, 256, split="train"), jsonl[:3])
    assert _same(load_examples(tmp_path / "ds", tiny_tok, 256, split="test"), jsonl[3:])
    with pytest.raises(DataError, match=r"ds: cannot load the dataset.*validation"):
        load_examples(tmp_path / "ds", tiny_tok, 256, split="validation")
