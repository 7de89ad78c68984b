"""Reading annotation files with line numbers: the low-level readers every adapter shares.

Malformed input raises ``DatasetError`` naming the file and the line or key. The error is
defined here, at the bottom of the package, because these readers are the first to raise it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from astar.pipelines.text import NotUTF8Error, decode_utf8


class DatasetError(Exception):
    """Annotations or a prepared dataset directory are malformed or inconsistent."""


def _read_text(path: Path) -> str:
    """A whole UTF-8 file (a byte-order mark dropped); a bad byte raises naming its line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error}") from error
    try:
        return decode_utf8(data, str(path))
    except NotUTF8Error as error:
        raise DatasetError(str(error)) from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) split on "\\n" only: a stray "\\r" or U+2028 inside a caption must not
    start a new record (text-mode reading would split there)."""
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _csv_rows(
    path: Path, required: Sequence[str], optional: Sequence[str] = ()
) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """The columns found and (line number, row) pairs of a CSV with a header.

    A leading unnamed column (a pandas index written with the data) is ignored. A row with the
    wrong number of fields, or a missing required column, raises naming the file and line.
    """
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise DatasetError(f"{path}, line 1: malformed CSV header: {error}") from None
    if not header:
        raise DatasetError(f"{path}: empty file, expected a CSV header with {list(required)}")
    skip_index = header[0].strip() == "" or header[0].startswith("Unnamed")
    columns = [c.strip() for c in (header[1:] if skip_index else header)]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatasetError(
            f"{path}, line 1: missing column(s) {missing}; found {columns} "
            f"(required {list(required)}, optional {list(optional)})"
        )

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        try:
            for fields in reader:
                number = reader.line_num
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DatasetError(
                        f"{path}, line {number}: expected {len(header)} fields, found {len(fields)}"
                    )
                values = fields[1:] if skip_index else fields
                yield number, dict(zip(columns, values, strict=True))
        except csv.Error as error:
            raise DatasetError(f"{path}, line {reader.line_num}: malformed CSV: {error}") from None

    return columns, rows()


def _load_json(path: Path) -> Any:
    """Parsed JSON; a duplicate key anywhere is an error (``json`` would keep the last)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise DatasetError(f"{path}: duplicate key {key!r}")
            seen[key] = value
        return seen

    text = _read_text(path)
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{path}, line {error.lineno} column {error.colno}: malformed JSON: {error.msg}"
        ) from None


def _number_text(value: str) -> str:
    """Integral numbers without a decimal part ("5.0" from a re-saved CSV -> "5"), else as is."""
    try:
        number = float(value)
    except ValueError:
        return value.strip()
    return str(int(number)) if number.is_integer() else value.strip()


def _require(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"{where}: expected {names}, found {value!r:.80}")
    return value
