"""Generic tables: one jsonl, parquet, csv or tsv file read through a column layout.

``jsonl:my.jsonl?query=question&positive=answer`` reads a pairs file whose columns are not the
default names; see :mod:`.layout` for the default names and layouts. The file is one table, its split
named by ``?split=`` or by the file name (``test.tsv`` → "test", default "train").

Each format streams: jsonl line by line, csv through the csv module (real CSV quotes its fields),
tsv line by line with **no quote handling** (as MS MARCO: a raw ``"`` is text, never a quote; a
row with another field count than the header is rejected, never merged), parquet in record
batches of the needed columns only (``pyarrow.parquet.ParquetFile.iter_batches``).
"""

from __future__ import annotations

import csv
import io
import json
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path

from .base import SourceOptions
from .errors import BadSourceError
from .reading import (
    iter_lines,
    iter_objects,
    iter_parquet_rows,
    open_bytes,
    parquet_columns,
    require_file,
    split_from_name,
)
from .table import Row, TableSource

__all__ = ["CsvSource", "JsonlSource", "ParquetSource", "TabularSource", "TsvSource"]

PEEK_ROWS = 100  # jsonl columns: the union of the keys of the first rows (optional keys may be absent from one)


class TabularSource(TableSource):
    """One table file; subclasses read one format each.

    Example:
        >>> src = JsonlSource("jsonl:pairs.jsonl", "pairs.jsonl", SourceOptions(columns={"positive": "answer"}))
        >>> src.layouts["train"].kind
        'pairs'
    """

    @classmethod
    def reads_file(cls, path: Path, root: Path) -> bool:
        """None: a table is one file (a folder is an error, and its copy stays empty)."""
        return False

    def __init__(
        self, spec: str, location: str, options: SourceOptions, params: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(spec, location, options, params)
        self.path = require_file(Path(location), self.kind, f"a .{self.kind} file with a header or named columns")
        self.split = self.params.get("split") or split_from_name(self.path.name, "train")
        self._add_table(self.split, self._columns(), hint=self.path.name)

    @abstractmethod
    def _columns(self) -> list[str]:
        """The file's column names."""


class JsonlSource(TabularSource):
    """JSON lines (``.jsonl``, ``.jsonl.gz``, or a ``.json`` array), one object per row."""

    kind = "jsonl"

    def _columns(self) -> list[str]:
        if self.path.name.lower().removesuffix(".gz").endswith(".json"):
            rows = islice(iter_objects(self.path, self), PEEK_ROWS)
            return list(dict.fromkeys(k for _, obj in rows for k in obj))
        keys: dict[str, None] = {}
        with open_bytes(self.path) as f:
            for raw in islice(f, PEEK_ROWS):
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # reported with its line number when the rows are read
                keys.update(dict.fromkeys(obj) if isinstance(obj, dict) else {})
        return list(keys)

    def _rows(self, split: str, columns: list[str]) -> Iterator[tuple[str, Row]]:
        return iter_objects(self.path, self)


class ParquetSource(TabularSource):
    """A parquet file, read in batches of the needed columns."""

    kind = "parquet"

    def _columns(self) -> list[str]:
        return parquet_columns(self.path)

    def _rows(self, split: str, columns: list[str]) -> Iterator[tuple[str, Row]]:
        return iter_parquet_rows(self.path, columns)


class CsvSource(TabularSource):
    """A CSV file with a header row, RFC 4180 quoting (a quoted field may span lines)."""

    kind = "csv"

    def _columns(self) -> list[str]:
        return next(self._csv_records(), (None, []))[1]

    def _csv_records(self) -> Iterator[tuple[int, list[str]]]:
        with io.TextIOWrapper(open_bytes(self.path), encoding="utf-8-sig", newline="") as text:
            reader = csv.reader(text)
            try:
                for fields in reader:
                    if fields:
                        yield reader.line_num, fields
            except (csv.Error, UnicodeDecodeError, OSError, EOFError) as e:
                raise BadSourceError(f"Cannot read CSV '{self.path}' near line {reader.line_num + 1}: {e}.") from e

    def _rows(self, split: str, columns: list[str]) -> Iterator[tuple[str, Row]]:
        records = self._csv_records()
        header = next(records, (0, []))[1]
        for line, fields in records:
            if len(fields) != len(header):
                self.reject(f"{self.path}:{line}", f"expected {len(header)} fields as in the header, got {len(fields)}")
                continue
            yield f"{self.path}:{line}", dict(zip(header, fields, strict=True))


class TsvSource(TabularSource):
    """A tab-separated file with a header line; no quoting, texts kept exactly."""

    kind = "tsv"

    def _columns(self) -> list[str]:
        for _, line in iter_lines(self.path, self):
            return line.split("\t")
        raise BadSourceError(f"'{self.path}' is empty; tsv: needs a header line naming its columns.")

    def _rows(self, split: str, columns: list[str]) -> Iterator[tuple[str, Row]]:
        lines = iter_lines(self.path, self)
        header = next(lines, ("", ""))[1].split("\t")
        for origin, line in lines:
            fields = line.split("\t")
            if len(fields) != len(header):
                self.reject(origin, f"expected {len(header)} tab-separated fields as in the header, got {len(fields)}")
                continue
            yield origin, dict(zip(header, fields, strict=True))
