"""Caption sanitising and normalising (astar.pipelines.text)."""

from __future__ import annotations

import collections

import pytest

from astar.pipelines.text import normalise_caption, sanitise_caption, tokenize

# Each breaks a line for some reader: str.splitlines, the PTB tokenizer, METEOR's protocol.
LINE_BREAKERS = ["\r", "\n", "\r\n", "\u2028", "\u2029", "\x0b", "\x0c", "\x85", "\x1c"]


@pytest.mark.parametrize("breaker", LINE_BREAKERS)
def test_sanitise_makes_one_line_of_any_line_breaker(breaker):
    text = f"A dog{breaker}runs."
    assert sanitise_caption(text) == "A dog runs."
    assert len(sanitise_caption(text).splitlines()) == 1


def test_sanitise_removes_bom_and_meteor_separator_and_keeps_case_and_punctuation():
    assert sanitise_caption("\ufeffA man, slicing|||bread!") == "A man, slicing bread!"
    assert sanitise_caption("of\ufeffcourse") == "of course"  # a BOM between words splits them
    assert sanitise_caption("  two   spaces\tand tab ") == "two spaces and tab"


@pytest.mark.parametrize("text", ["", "   ", "\ufeff", "|||", "\r\n", "...!?", "\u2028\u2029"])
def test_empty_and_punctuation_only_captions_normalise_to_nothing(text):
    assert normalise_caption(text) == ""
    assert tokenize(text) == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man is slicing bread.", "a man is slicing bread"),
        ("It's a cat's toy!", "it s a cat s toy"),  # as the S2VT MSVD files: "it s"
        ("A man\rplays|||guitar\u2028loudly", "a man plays guitar loudly"),
        ("\ufeffThe DOG\u2029runs", "the dog runs"),
        ("rock-n-roll / jazz_band", "rock n roll jazz band"),
        ("Ｆｕｌｌ ｗｉｄｔｈ", "full width"),  # NFKC folding
        ("L'Arlésienne — Bizet", "l arlésienne bizet"),
        ("3 dogs, 2 cats", "3 dogs 2 cats"),
    ],
)
def test_normalise(raw, expected):
    assert normalise_caption(raw) == expected


@pytest.mark.parametrize("raw", ["It's A DOG!!", "a\r\nb|||c", "\ufeffx\u2028y", "Ｆｕｌｌ"])
def test_sanitise_and_normalise_are_idempotent(raw):
    once = normalise_caption(raw)
    assert normalise_caption(once) == once
    clean = sanitise_caption(raw)
    assert sanitise_caption(clean) == clean


def test_normalised_raw_msvd_descriptions_match_the_s2vt_sentences(shared_data):
    """Our normalisation of the original descriptions reproduces the S2VT processing of the
    same clips (which also truncated some long sentences, hence not 100%)."""
    import pandas as pd

    msvd = shared_data / "msvd"
    mapping = dict(line.split()[:2] for line in (msvd / "youtube_mapping.txt").open())
    raw = pd.read_csv(msvd / "raw_val.csv", dtype=str, keep_default_na=False)
    videos = (raw["VideoID"] + "_" + raw["Start"] + "_" + raw["End"]).map(mapping)
    ours = collections.Counter(zip(videos, raw["Description"].map(normalise_caption), strict=True))
    theirs = collections.Counter(
        tuple(line.rstrip("\n").split("\t")) for line in (msvd / "sents_val_lc_nopunc.txt").open()
    )
    matched = sum((ours & theirs).values())
    assert matched / sum(theirs.values()) > 0.97
    assert all(normalise_caption(c) == c for _, c in theirs)  # theirs are already normal
