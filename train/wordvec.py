"""Pretrained word vectors for the embedding W_e: word2vec binary, word2vec text or GloVe text.

The GoogleNews word2vec file is 3.6 GB (3M words x 300 float32). It is streamed in blocks and
only the vocabulary's words are decoded, so memory stays at one block plus the (V, M) matrix.

Matching: an exact match wins; otherwise the first case-insensitive match in file order (the
files are sorted by frequency, so "Paris" stands in for our lower-cased "paris"). Words absent
from the file, and ``<eos>`` and ``<unk>``, start U[-init_range, init_range] like every other
non-recurrent weight (ASTAR-NOTES); ``<pad>`` is a zero row, since it is never read as input
that matters.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from astar.pipelines.vocab import PAD_ID, SPECIAL_TOKENS, Vocabulary

__all__ = ["WordVectors", "WordVectorsError", "detect_format", "load_word_vectors"]

Format = Literal["word2vec-binary", "word2vec-text", "glove"]
FORMATS: tuple[str, ...] = ("word2vec-binary", "word2vec-text", "glove")
_BLOCK = 1 << 20  # bytes read at a time from a binary file


class WordVectorsError(Exception):
    """A vectors file is unreadable, malformed or of the wrong size."""


@dataclass(frozen=True)
class WordVectors:
    """An embedding initialisation for one vocabulary."""

    matrix: np.ndarray  # (V, M) float32, row i is word i of the vocabulary
    found: np.ndarray  # (V,) bool: the row came from the file
    oov_rate: float  # fraction of the ordinary words (special tokens excluded) not in the file
    source: str  # the file the vectors came from
    format: str  # one of FORMATS
    file_words: int  # words the file holds

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def describe(self) -> str:
        return (
            f"{self.source} ({self.format}, {self.file_words} x {self.dim}): "
            f"{int(self.found.sum())}/{len(self.found)} vocabulary rows found, "
            f"out-of-vocabulary rate {100 * self.oov_rate:.2f}%"
        )


def _open(path: Path) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    except OSError as error:
        raise WordVectorsError(f"{path}: cannot open the word vectors: {error}") from error


def _parse_header(line: bytes) -> tuple[int, int] | None:
    """(words, dim) from a word2vec header line, or None when the line is not one."""
    fields = line.split()
    if len(fields) != 2 or not all(f.isdigit() for f in fields):
        return None
    return int(fields[0]), int(fields[1])


def detect_format(path: str | Path) -> Format:
    """Tell the three formats apart from the first bytes.

    No header ("V D") means GloVe. With a header, the file is word2vec text when its first
    entry is a line of a word and D numbers, else word2vec binary.
    """
    path = Path(path)
    with _open(path) as handle:
        head = handle.read(1 << 16)
    first, _, rest = head.partition(b"\n")
    header = _parse_header(first)
    if header is None:
        return "glove"
    entry = rest.split(b"\n", 1)[0]
    try:
        fields = entry.decode("utf-8").rstrip().split(" ")
        [float(x) for x in fields[-header[1] :]]
    except (UnicodeDecodeError, ValueError):
        return "word2vec-binary"
    return "word2vec-text" if len(fields) >= header[1] + 1 else "word2vec-binary"


class _Matcher:
    """Collects vectors for the vocabulary's words: exact matches win, then case-folded ones."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        special = len(SPECIAL_TOKENS)
        self.exact = {w: i for i, w in enumerate(vocabulary.words) if i >= special}
        self.folded: dict[str, list[int]] = {}
        for word, index in self.exact.items():
            self.folded.setdefault(word.casefold(), []).append(index)
        self.rows: dict[int, np.ndarray] = {}  # vocabulary id -> vector
        self.exact_rows: set[int] = set()

    def wants(self, word: str) -> list[int]:
        """Vocabulary ids this file word should fill (empty: skip its vector)."""
        index = self.exact.get(word)
        if index is not None:
            return [] if index in self.exact_rows else [index]
        return [i for i in self.folded.get(word.casefold(), ()) if i not in self.rows]

    def take(self, word: str, ids: list[int], vector: np.ndarray) -> None:
        for index in ids:
            self.rows[index] = vector
            if self.exact.get(word) == index:
                self.exact_rows.add(index)


def _binary_entries(
    path: Path, handle: BinaryIO, count: int, dim: int
) -> Iterator[tuple[str, bytes]]:
    """(word, raw vector bytes) for each of the ``count`` entries after the header."""
    width = 4 * dim
    buffer, position = b"", 0
    for entry in range(count):
        while True:
            space = buffer.find(b" ", position)
            if space >= 0 and len(buffer) - space - 1 >= width:
                break
            block = handle.read(_BLOCK)
            if not block:
                raise WordVectorsError(
                    f"{path}: truncated: the header promises {count} words, the file ends "
                    f"inside entry {entry + 1}"
                )
            buffer, position = buffer[position:] + block, 0
        # word2vec's own writer puts "\n" after each vector; GoogleNews does not. Strip both.
        raw_word = buffer[position:space].lstrip(b"\n")
        vector = buffer[space + 1 : space + 1 + width]
        position = space + 1 + width
        yield raw_word.decode("utf-8", errors="replace"), vector


def _text_entries(
    path: Path, lines: Iterator[tuple[int, bytes]], dim: int | None
) -> Iterator[tuple[str, list[bytes], int]]:
    """(word, number fields, line number); a word may contain spaces (GloVe 840B has some)."""
    for number, line in lines:
        fields = line.rstrip(b"\r\n").rstrip(b" ").split(b" ")
        if fields == [b""]:
            continue
        if dim is None:
            dim = len(fields) - 1
            if dim < 1:
                raise WordVectorsError(f"{path}, line {number}: a word without a vector")
        if len(fields) < dim + 1:
            raise WordVectorsError(
                f"{path}, line {number}: expected a word and {dim} numbers, "
                f"found {len(fields)} fields"
            )
        word = b" ".join(fields[:-dim]).decode("utf-8", errors="replace")
        yield word, fields[-dim:], number


def load_word_vectors(
    path: str | Path,
    vocabulary: Vocabulary,
    *,
    format: Format | None = None,
    dim: int | None = None,
    init_range: float = 0.01,
    seed: int = 0,
) -> WordVectors:
    """The (V, M) embedding initialisation of ``vocabulary`` from a vectors file.

    ``format`` None: detected (``detect_format``). ``dim``: the expected M, checked against
    the file. Rows not found are U[-init_range, init_range] from ``seed``; ``<pad>`` is zero.
    """
    path = Path(path)
    if not path.is_file():
        raise WordVectorsError(f"{path}: no such word vectors file")
    format = format or detect_format(path)
    if format not in FORMATS:
        raise WordVectorsError(f"unknown word vectors format {format!r}; choose from {FORMATS}")
    matcher = _Matcher(vocabulary)
    with _open(path) as handle:
        if format == "word2vec-binary":
            file_words, file_dim = _read_header(path, handle.readline())
            _check_dim(path, file_dim, dim)
            for word, raw in _binary_entries(path, handle, file_words, file_dim):
                ids = matcher.wants(word)
                if ids:
                    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)  # (M,)
                    matcher.take(word, ids, vector)
        else:
            lines = enumerate(handle, start=1)  # (line number, bytes)
            file_dim = None
            declared = None
            if format == "word2vec-text":
                declared, file_dim = _read_header(path, next(lines, (1, b""))[1])
                _check_dim(path, file_dim, dim)
            file_words = 0
            for word, fields, number in _text_entries(path, lines, file_dim):
                file_words += 1
                if file_dim is None:
                    file_dim = len(fields)
                    _check_dim(path, file_dim, dim)
                ids = matcher.wants(word)
                if ids:
                    try:
                        vector = np.array([float(x) for x in fields], dtype=np.float32)  # (M,)
                    except ValueError:
                        raise WordVectorsError(
                            f"{path}, line {number}: the vector of {word!r} is not numeric"
                        ) from None
                    matcher.take(word, ids, vector)
            if declared is not None and declared != file_words:
                raise WordVectorsError(
                    f"{path}: the header promises {declared} words, the file holds {file_words}"
                )
            if file_dim is None:
                raise WordVectorsError(f"{path}: no vectors in the file")
    return _assemble(path, format, vocabulary, matcher, file_words, file_dim, init_range, seed)


def _read_header(path: Path, line: bytes) -> tuple[int, int]:
    header = _parse_header(line)
    if header is None or header[1] < 1:
        raise WordVectorsError(
            f"{path}, line 1: expected a word2vec header 'WORDS DIM', found {line[:80]!r}"
        )
    return header


def _check_dim(path: Path, file_dim: int, expected: int | None) -> None:
    if expected is not None and file_dim != expected:
        raise WordVectorsError(
            f"{path}: vectors have {file_dim} dimensions, the embedding expects {expected}"
        )


def _assemble(
    path: Path,
    format: str,
    vocabulary: Vocabulary,
    matcher: _Matcher,
    file_words: int,
    dim: int,
    init_range: float,
    seed: int,
) -> WordVectors:
    rng = np.random.default_rng(seed)
    size = len(vocabulary)
    matrix = rng.uniform(-init_range, init_range, (size, dim)).astype(np.float32)  # (V, M)
    matrix[PAD_ID] = 0.0
    found = np.zeros(size, dtype=bool)  # (V,)
    if matcher.rows:
        ids = np.fromiter(matcher.rows, dtype=np.int64)  # (n,)
        matrix[ids] = np.stack(list(matcher.rows.values()))  # (n, M)
        found[ids] = True
    ordinary = size - len(SPECIAL_TOKENS)
    oov_rate = 1.0 - found.sum() / ordinary if ordinary else 0.0
    return WordVectors(
        matrix=matrix,
        found=found,
        oov_rate=float(oov_rate),
        source=str(path),
        format=format,
        file_words=file_words,
    )
