"""Loading, cleaning and splitting (description, page) pairs.

Sources: a hub dataset id (``jawerty/html_dataset``: ``label`` is the description, ``html``
the page) or a local JSON / JSONL / CSV / Parquet file with configurable column names.
Every problem with the input is a :class:`DataError` whose message names the file, row and
column, so a user can fix the data instead of reading a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model.errors import first_line
from training.config import TrainConfig
from training.errors import DataError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Pair:
    """One training example. ``truncated`` pages get no EOS (they did not really end)."""

    description: str
    page: str
    truncated: bool = False


@dataclass
class CleanReport:
    """What cleaning did, reported in the logs and the metrics JSON."""

    rows: int = 0
    empty: int = 0
    duplicates: int = 0
    overlong_dropped: int = 0
    overlong_truncated: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.rows} rows: kept {self.kept}, dropped {self.empty} empty, "
            f"{self.duplicates} duplicates, {self.overlong_dropped} over-long; "
            f"truncated {self.overlong_truncated} over-long"
        )


@dataclass(frozen=True)
class Splits:
    train: list[Pair]
    eval: list[Pair]
    report: CleanReport


def _is_local(source: str) -> bool:
    path = Path(source)
    return path.exists() or path.suffix.lower() in LOCAL_SUFFIXES


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
            "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _read_json(path: Path) -> Iterator[dict[str, Any]]:
    text = _decode(path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {number} is not an object")
            yield row
        return
    # JSON Lines (also accepted under a .json name, as `datasets` writes it).
    for number, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        yield row


def _read_csv(path: Path) -> Iterator[dict[str, Any]]:
    text = _decode(path)
    # The csv module refuses fields over 128 KiB with an obscure error; real pages can be
    # bigger, and the size limit is checked (with a clear message) by the caller.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield from csv.DictReader(io.StringIO(text, newline=""))
    except csv.Error as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from None


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path} is not a readable Parquet file: {exc}") from None
    yield from table.to_pylist()


def _read_local(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_hub(dataset_id: str, split: str) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError("loading a hub dataset needs the `datasets` package") from None
    try:
        loaded = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # offline, unknown id, unknown split: all end the run here
        raise DataError(
            f"can't load hub dataset {dataset_id!r} (split {split!r}): {first_line(exc)}; "
            "for offline use pass a local .jsonl/.csv/.parquet file with --data"
        ) from None
    yield from loaded


def read_rows(config: TrainConfig) -> Iterator[dict[str, Any]]:
    """Raw rows from the configured source, as dicts."""
    if _is_local(config.data):
        return _read_local(Path(config.data))
    return _read_hub(config.data, config.data_split)


def _as_text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where} is not UTF-8 text") from None
    if isinstance(value, float) and value != value:  # NaN: an empty CSV/Parquet cell
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where} holds a {type(value).__name__}, not text")
    return value


def extract_pairs(rows: Iterable[dict[str, Any]], config: TrainConfig) -> Iterator[tuple[str, str]]:
    """(description, page) of each row; checks columns and the row size limit."""
    columns = (config.description_column, config.page_column)
    for number, row in enumerate(rows, start=1):
        missing = [column for column in columns if column not in row]
        if missing:
            found = ", ".join(map(str, row)) or "none"
            raise DataError(
                f"{config.data}: row {number} has no column {', '.join(map(repr, missing))} "
                f"(columns found: {found}); set --description-column / --page-column"
            )
        description = _as_text(
            row[config.description_column], f"row {number}, column {columns[0]!r}"
        )
        page = _as_text(row[config.page_column], f"row {number}, column {columns[1]!r}")
        size = len(description.encode("utf-8")) + len(page.encode("utf-8"))
        if size > config.max_row_bytes:
            raise DataError(
                f"{config.data}: row {number} is {size / 1e6:.1f} MB, over the "
                f"{config.max_row_bytes / 1e6:.1f} MB row limit (--max-row-bytes); "
                "that is not a web page the model should learn"
            )
        yield description, page
        if config.max_rows is not None and number >= config.max_rows:
            return


_SPACES = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_description(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def normalize_page(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def clean(pairs: Iterable[tuple[str, str]], config: TrainConfig) -> tuple[list[Pair], CleanReport]:
    """Normalise whitespace; drop empty and duplicate rows; drop or truncate long pages."""
    report = CleanReport()
    seen: set[tuple[str, str]] = set()
    kept: list[Pair] = []
    for raw_description, raw_page in pairs:
        report.rows += 1
        description = normalize_description(raw_description)
        page = normalize_page(raw_page)
        if not description or not page:
            report.empty += 1
            continue
        key = (description, page)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        truncated = False
        if len(page) > config.max_page_chars:
            if config.overlong == "drop":
                report.overlong_dropped += 1
                continue
            page = page[: config.max_page_chars]
            truncated = True
            report.overlong_truncated += 1
        kept.append(Pair(description, page, truncated))
    report.kept = len(kept)
    return kept, report


def split(
    pairs: list[Pair], eval_fraction: float, seed: int, max_eval: int
) -> tuple[list[Pair], list[Pair]]:
    """A deterministic train/eval split: the same data and seed give the same split."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if eval_fraction > 0 and len(pairs) >= 2:
        n_eval = min(max_eval, max(1, round(len(pairs) * eval_fraction)), len(pairs) - 1)
    eval_ids = sorted(order[:n_eval])
    train_ids = sorted(order[n_eval:])
    return [pairs[i] for i in train_ids], [pairs[i] for i in eval_ids]


def load_splits(config: TrainConfig) -> Splits:
    """Read, clean and split the configured data. Raises :class:`DataError` if nothing is left."""
    pairs, report = clean(extract_pairs(read_rows(config), config), config)
    log.info("data %s: %s", config.data, report.summary())
    if report.rows == 0:
        raise DataError(f"{config.data} holds no rows")
    if not pairs:
        raise DataError(f"{config.data}: no usable rows left after cleaning ({report.summary()})")
    train, evaluation = split(pairs, config.eval_fraction, config.seed, config.max_eval_rows)
    return Splits(train=train, eval=evaluation, report=report)
