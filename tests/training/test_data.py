"""Data loading, cleaning, splitting, and clear errors for bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from training.cli import main
from training.config import TrainConfig
from training.data import clean, extract_pairs, load_splits, normalize_page, read_rows, split
from training.errors import DataError

from .conftest import FIXTURE

PAGE = "<!DOCTYPE html>\n<html><body><h1>Hi</h1></body></html>"


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def config_for(path: Path, **changes: object) -> TrainConfig:
    return TrainConfig(data=str(path), **changes)  # type: ignore[arg-type]


def test_fixture_is_realistic() -> None:
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 30
    assert len({row["label"] for row in rows}) == len(rows)
    for row in rows:
        assert row["html"].startswith("<!DOCTYPE html>") and row["html"].endswith("</html>")
        assert 8 < len(row["label"]) < 120
    assert FIXTURE.stat().st_size < 64_000


def test_cleaning_counts_and_normalises(tmp_path: Path) -> None:
    rows = [
        {"label": "  a   bakery\tpage ", "html": PAGE + "  \r\n\r\n\r\n\r\n"},
        {"label": "a bakery page", "html": PAGE},  # duplicate after normalising
        {"label": "", "html": PAGE},  # empty description
        {"label": "blank page", "html": "   \n  "},  # empty page
        {"label": "huge", "html": "<html>" + "x" * 500 + "</html>"},
        {"label": "fine", "html": PAGE.replace("Hi", "Fine")},
    ]
    config = config_for(write_jsonl(tmp_path / "d.jsonl", rows), max_page_chars=200)
    pairs, report = clean(extract_pairs(read_rows(config), config), config)
    assert [pair.description for pair in pairs] == ["a bakery page", "fine"]
    assert pairs[0].page == PAGE
    assert (report.rows, report.empty, report.duplicates, report.overlong_dropped) == (6, 2, 1, 1)
    assert report.kept == 2

    config = config_for(tmp_path / "d.jsonl", max_page_chars=200, overlong="truncate")
    pairs, report = clean(extract_pairs(read_rows(config), config), config)
    huge = next(pair for pair in pairs if pair.description == "huge")
    assert len(huge.page) == 200 and huge.truncated
    assert report.overlong_truncated == 1 and report.overlong_dropped == 0


def test_normalize_page_keeps_indentation() -> None:
    assert normalize_page("<p>\r\n    text   \r\n</p>") == "<p>\n    text\n</p>"


def test_split_is_deterministic_and_disjoint() -> None:
    config = TrainConfig(data=str(FIXTURE))
    first = load_splits(config)
    second = load_splits(config)
    assert first.train == second.train and first.eval == second.eval
    assert len(first.eval) == round(33 * 0.1)
    assert not set(first.train) & set(first.eval)
    other = load_splits(TrainConfig(data=str(FIXTURE), seed=7))
    assert other.eval != first.eval
    train, evaluation = split(first.train, 0.0, 1, 10)
    assert evaluation == [] and len(train) == len(first.train)


def test_csv_json_and_parquet_with_custom_columns(tmp_path: Path) -> None:
    rows = [{"prompt": f"page {i}", "code": PAGE.replace("Hi", f"Page {i}")} for i in range(5)]
    big_page = "<html>" + "y" * 200_000 + "</html>"  # over the csv module's default field limit
    rows.append({"prompt": "big one", "code": big_page})
    files = []
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "code"])
        writer.writeheader()
        writer.writerows(rows)
    files.append(tmp_path / "d.csv")
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    files.append(tmp_path / "d.json")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    files.append(tmp_path / "d.parquet")
    for file in files:
        config = config_for(
            file, description_column="prompt", page_column="code", max_page_chars=300_000
        )
        splits = load_splits(config)
        assert splits.report.kept == 6, file
        assert {pair.description for pair in splits.train + splits.eval} >= {"page 0", "big one"}


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"description": "x", "html": PAGE}])
    with pytest.raises(
        DataError, match=r"row 1 has no column 'label' \(columns found: description, html\)"
    ):
        load_splits(config_for(path))


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no rows"):
        load_splits(config_for(tmp_path / "empty.jsonl"))
    path = write_jsonl(
        tmp_path / "blank.jsonl", [{"label": " ", "html": PAGE}, {"label": "x", "html": ""}]
    )
    with pytest.raises(DataError, match="no usable rows left after cleaning"):
        load_splits(config_for(path))


def test_ten_megabyte_row(tmp_path: Path) -> None:
    rows = [
        {"label": "ok", "html": PAGE},
        {"label": "huge", "html": "<p>" + "a" * 10_000_000 + "</p>"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2 is 10\.0 MB, over the 2\.0 MB row limit"):
        load_splits(config_for(path))


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("label,html\ncaf\xe9 menu,<html></html>\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_splits(config_for(path))


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_splits(config_for(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        load_splits(config_for(tmp_path / "d.txt"))


def test_cli_reports_data_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"description": "x", "page": PAGE}])
    assert main(["--data", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no column 'label'" in err and "\n" not in err


def test_offline_hub_dataset_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="can't load hub dataset 'jawerty/html_dataset'"):
        load_splits(TrainConfig())


def test_hub_dataset_with_default_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is faked at its edge: `datasets.load_dataset` returns a real Dataset."""
    import datasets

    rows = [
        {"label": f"page {i}", "html": PAGE.replace("Hi", str(i)), "extra": i} for i in range(6)
    ]
    seen: list[tuple[str, str]] = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        seen.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_splits(TrainConfig())
    assert seen == [("jawerty/html_dataset", "train")]
    assert splits.report.kept == 6 and len(splits.eval) == 1
