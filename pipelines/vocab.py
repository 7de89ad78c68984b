"""The captioner's vocabulary: words <-> ids, with padding, end-of-sentence and unknown tokens.

Ids 0, 1 and 2 are ``<pad>``, ``<eos>`` and ``<unk>``. There is no begin-of-sentence token:
the first word is predicted from fc7 alone (ASTAR-NOTES, eqs. 1-3). The other words follow in
order of decreasing count, ties alphabetical, so the same captions always give the same ids.

A vocabulary is stored with the dataset (``vocab.json``) and inside checkpoints
(``to_dict``); loading checks it completely, because a silently shifted id table would make a
checkpoint produce fluent nonsense.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from astar.pipelines.text import NotUTF8Error, decode_utf8, tokenize

__all__ = [
    "EOS",
    "EOS_ID",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "UNK",
    "UNK_ID",
    "VocabConfig",
    "Vocabulary",
    "VocabularyError",
]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
FORMAT = "astar-vocabulary"
FORMAT_VERSION = 1


class VocabularyError(Exception):
    """A vocabulary file or dictionary is malformed, or the build settings are invalid."""


@dataclass(frozen=True)
class VocabConfig:
    """How a dataset's vocabulary is built."""

    min_count: int = 1  # words seen fewer times become <unk>
    source: Literal["train", "paper"] = "train"  # train split only, or all splits (the paper's V)
    max_length: int | None = None  # words kept per caption (eos extra); None: the longest seen

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise VocabularyError(f"min_count must be >= 1, got {self.min_count}")
        if self.source not in ("train", "paper"):
            raise VocabularyError(f"vocabulary source must be 'train' or 'paper': {self.source!r}")
        if self.max_length is not None and self.max_length < 1:
            raise VocabularyError(f"max_length must be >= 1 or None, got {self.max_length}")


class Vocabulary:
    """Word ids for encoding captions and decoding predictions."""

    def __init__(
        self,
        words: Sequence[str],
        max_length: int,
        min_count: int = 1,
        source: str = "train",
    ) -> None:
        """``words``: the ordinary words (ids 3, 4, ...), special tokens excluded."""
        problems = []
        if max_length < 1:
            problems.append(f"max_length must be >= 1, got {max_length}")
        duplicates = sorted(w for w, n in Counter(words).items() if n > 1)
        if duplicates:
            problems.append(f"duplicate words {duplicates[:5]}")
        bad = [
            w
            for w in words
            if w in SPECIAL_TOKENS or not w or len(w.split()) != 1 or w != w.strip()
        ]
        if bad:
            problems.append(f"words must be single non-special tokens, got {bad[:5]}")
        if problems:
            raise VocabularyError("invalid vocabulary: " + "; ".join(problems))
        self.words: tuple[str, ...] = (*SPECIAL_TOKENS, *words)  # id -> word
        self.ids: dict[str, int] = {word: i for i, word in enumerate(self.words)}  # word -> id
        self.max_length = max_length
        self.min_count = min_count
        self.source = source

    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    @classmethod
    def build(
        cls,
        captions: Iterable[str],
        min_count: int = 1,
        max_length: int | None = None,
        source: str = "train",
        normalized: bool = False,
    ) -> Vocabulary:
        """Count the words of ``captions``; keep those seen ``min_count`` times.

        Captions are normalised here unless ``normalized`` says they already are (a dataset's
        ``normalized`` column: normalising 10^5 captions twice costs seconds).
        ``max_length`` defaults to the longest caption, in words, among ``captions``.
        """
        split = str.split if normalized else tokenize
        counts: Counter[str] = Counter()
        longest = 0
        for caption in captions:
            words = split(caption)
            counts.update(words)
            longest = max(longest, len(words))
        if not counts:
            raise VocabularyError("cannot build a vocabulary from no words (no non-empty caption)")
        kept = [w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls(kept, max_length=max_length or longest, min_count=min_count, source=source)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, max_length={self.max_length}, source={self.source})"

    def encode(self, caption: str) -> list[int]:
        """Word ids of ``caption`` (normalised here), at most ``max_length`` words, then eos."""
        words = tokenize(caption)[: self.max_length]
        return [self.ids.get(word, UNK_ID) for word in words] + [EOS_ID]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first eos; padding is skipped, unknown words show as <unk>."""
        words = []
        for token in ids:
            token = int(token)
            if token == EOS_ID:
                break
            if token == PAD_ID:
                continue
            if not 0 <= token < len(self.words):
                raise VocabularyError(f"id {token} outside the vocabulary (size {len(self)})")
            words.append(self.words[token])
        return " ".join(words)

    def unknown_rate(self, captions: Iterable[str], normalized: bool = False) -> float:
        """Fraction of the words of ``captions`` that encode as <unk> (0 when there are none)."""
        split = str.split if normalized else tokenize
        total = unknown = 0
        for caption in captions:
            words = split(caption)
            total += len(words)
            unknown += sum(word not in self.ids for word in words)
        return unknown / total if total else 0.0

    # --- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready and complete: ``from_dict`` rebuilds exactly this vocabulary."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "special_tokens": list(SPECIAL_TOKENS),
            "words": list(self.words[len(SPECIAL_TOKENS) :]),
            "max_length": self.max_length,
            "min_count": self.min_count,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str = "vocabulary") -> Vocabulary:
        """Inverse of ``to_dict``; ``origin`` names the file or checkpoint in error messages."""
        if not isinstance(data, dict):
            raise VocabularyError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise VocabularyError(
                f"{origin}: not a vocabulary of format {FORMAT} v{FORMAT_VERSION} "
                f"(format={data.get('format')!r}, version={data.get('version')!r})"
            )
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise VocabularyError(
                f"{origin}: special tokens {data.get('special_tokens')!r} differ from "
                f"{list(SPECIAL_TOKENS)} (ids would shift)"
            )
        words, max_length = data.get("words"), data.get("max_length")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise VocabularyError(f"{origin}: 'words' must be a list of strings")
        if not isinstance(max_length, int) or isinstance(max_length, bool):
            raise VocabularyError(f"{origin}: 'max_length' must be an integer, got {max_length!r}")
        try:
            return cls(
                words,
                max_length=max_length,
                min_count=int(data.get("min_count", 1)),
                source=str(data.get("source", "train")),
            )
        except VocabularyError as error:
            raise VocabularyError(f"{origin}: {error}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", "utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            data = json.loads(decode_utf8(path.read_bytes(), str(path)))
        except OSError as error:
            raise VocabularyError(f"{path}: cannot read the vocabulary: {error}") from error
        except NotUTF8Error as error:
            raise VocabularyError(str(error)) from None
        except json.JSONDecodeError as error:
            raise VocabularyError(f"{path}: not valid JSON: {error}") from error
        return cls.from_dict(data, origin=str(path))
