"""Caption text: sanitising (safe single lines) and normalising (the words the model sees).

Two levels, because two consumers need different things:

- ``sanitise_caption`` keeps case and punctuation (references for the metrics, whose PTB
  tokenizer does its own processing) but guarantees one line of single-spaced text. Captions
  scraped from the web carry byte-order marks, ``\\r``, Unicode line and paragraph separators
  (U+2028, U+2029) and control characters; each of these starts a new line for some reader
  (the PTB tokenizer, METEOR's protocol, ``str.splitlines``), which would shift every later
  caption onto the wrong video. METEOR's field separator ``|||`` inside a caption would add a
  phantom reference. Sanitising removes all of these.
- ``normalise_caption`` is what the vocabulary is built from and what the model is trained on:
  sanitised, NFKC-folded, lower-cased, every punctuation or symbol character replaced by a
  space, whitespace collapsed (ASTAR-NOTES: "lower-casing and removing punctuation"). A
  character becomes a space rather than nothing so that "it's" gives "it s" as in the S2VT
  MSVD files, and words glued by a slash or dash stay apart.

Both are idempotent, and an empty or all-punctuation caption becomes ``""``.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "METEOR_SEPARATOR",
    "NotUTF8Error",
    "decode_utf8",
    "normalise_caption",
    "sanitise_caption",
    "tokenize",
]

METEOR_SEPARATOR = "|||"

# C0 and C1 control characters, the byte-order mark, and the Unicode line/paragraph separators
# become spaces. A space rather than nothing: a stray BOM sits between words in MSVD's raw
# descriptions ("of\ufeff course").
# (A regular expression: str.translate with a dict is several times slower on 10^5 captions.)
_TO_SPACE = re.compile("[\x00-\x1f\x7f-\x9f\ufeff\u2028\u2029]")
# Anything that is not a letter, digit or whitespace; "_" counts as a word character for \w
# but is punctuation to a reader.
_NOT_WORD = re.compile(r"[^\w\s]|_")


def sanitise_caption(text: str) -> str:
    """One line of single-spaced text, case and punctuation kept, safe for every scorer."""
    text = _TO_SPACE.sub(" ", text).replace(METEOR_SEPARATOR, " ")
    return " ".join(text.split())


def normalise_caption(text: str) -> str:
    """Lower-case words separated by single spaces: no punctuation, symbols or control marks."""
    text = sanitise_caption(text)
    if not text.isascii():  # NFKC: full-width letters and ligatures become plain letters
        text = unicodedata.normalize("NFKC", text)
    text = text.lower()
    return " ".join(_NOT_WORD.sub(" ", text).split())


def tokenize(text: str) -> list[str]:
    """The words of a caption (normalised first, so raw text is accepted too)."""
    return normalise_caption(text).split()


class NotUTF8Error(ValueError):
    """A file's bytes are not UTF-8; the message names the file, line, column and byte."""


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as text (a leading byte-order mark dropped), or NotUTF8Error naming ``where``
    and the line and column of the first undecodable byte::

        captions.csv, line 2: not UTF-8 (byte 0xff at column 7)

    The whole file is decoded at once: a reader that decodes in blocks only knows the line it
    had reached when the block failed, often line 1.
    """
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NotUTF8Error(_not_utf8(data, error, where)) from None


def _not_utf8(data: bytes, error: UnicodeDecodeError, where: str) -> str:
    line_start = data.rfind(b"\n", 0, error.start) + 1
    line = data.count(b"\n", 0, error.start) + 1
    # Everything before the first bad byte decodes; the column counts characters, as editors do.
    column = len(data[line_start : error.start].decode("utf-8")) + 1
    return f"{where}, line {line}: not UTF-8 (byte 0x{data[error.start]:02x} at column {column})"
