"""COCO metrics: reference scores nobody here wrote, sanitising, missing videos, hangs and Java."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from astar.pipelines.metrics import (
    EMPTY_PREDICTION,
    MetricsError,
    check_java,
    run_scorers,
    sanitise_caption,
    score_captions,
    tokenize_ptb,
)

NO_METEOR = ("BLEU", "ROUGE_L", "CIDEr")  # METEOR's Java takes ~10 s to start: slow tests only
COCO_NAMES = {  # pycocoevalcap / nlg-eval key -> our key
    "Bleu_1": "BLEU-1",
    "Bleu_2": "BLEU-2",
    "Bleu_3": "BLEU-3",
    "Bleu_4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE_L",
    "CIDEr": "CIDEr",
}
HAS_PROC = Path("/proc/self/stat").exists()

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")


# --- Reference data ---------------------------------------------------------------------------


def _nlgeval(shared_data: Path) -> tuple[dict[str, str], dict[str, list[str]], dict]:
    folder = shared_data / "eval" / "nlgeval"
    hypotheses = (folder / "hyp.txt").read_text().splitlines()
    columns = [(folder / name).read_text().splitlines() for name in ("ref1.txt", "ref2.txt")]
    predictions = {str(i): hypothesis for i, hypothesis in enumerate(hypotheses)}
    references = {str(i): [column[i] for column in columns] for i in range(len(hypotheses))}
    return predictions, references, json.loads((folder / "EXPECTED_SCORES.json").read_text())


def _msvd(shared_data: Path, variant: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """SA-LSTM's MSVD test predictions and the S2VT (txt) or raw (csv) references, by vidN."""
    mapping_file = shared_data / "msvd" / "youtube_mapping.txt"
    mapping = dict(line.split() for line in mapping_file.open() if line.strip())
    predictions = {}
    tsv = shared_data / "eval" / "salstm_msvd" / "MSVD_test.tsv"
    for line in tsv.open(encoding="utf-8"):
        clip, prediction, _ = line.rstrip("\n").split("\t")
        predictions[mapping[clip]] = prediction
    references: dict[str, list[str]] = {}
    if variant == "s2vt_txt_refs":
        for line in (shared_data / "msvd" / "sents_test_lc_nopunc.txt").open(encoding="utf-8"):
            video, caption = line.rstrip("\n").split("\t", 1)
            references.setdefault(video, []).append(caption)
    else:
        with (shared_data / "msvd" / "raw_test.csv").open(newline="", encoding="utf-8") as rows:
            for row in csv.DictReader(rows):
                video = mapping[f"{row['VideoID']}_{row['Start']}_{row['End']}"]
                references.setdefault(video, []).append(row["Description"])
    return predictions, references


def _assert_matches(scores, expected: dict, *, abs_tol: float) -> None:
    """Our x 100 corpus scores against a reference file's 0..1 (CIDEr 0..10) scores."""
    for coco_name, value in expected.items():
        if coco_name in COCO_NAMES:
            ours = scores.corpus[COCO_NAMES[coco_name]] / 100
            assert ours == pytest.approx(value, abs=abs_tol), coco_name


# --- Against references nobody here wrote -------------------------------------------------------


def test_nlgeval_scores_without_meteor(shared_data: Path) -> None:
    predictions, references, expected = _nlgeval(shared_data)
    scores = score_captions(predictions, references, tokenize="whitespace", metrics=NO_METEOR)
    wanted = {k: v for k, v in expected["corpus_scores"].items() if k != "METEOR"}
    _assert_matches(scores, wanted, abs_tol=1e-6)
    assert set(scores.corpus) == {COCO_NAMES[name] for name in wanted}


@needs_java
@pytest.mark.slow
def test_nlgeval_all_scores_with_meteor(shared_data: Path) -> None:
    predictions, references, expected = _nlgeval(shared_data)
    scores = score_captions(predictions, references, tokenize="whitespace")
    _assert_matches(scores, expected["corpus_scores"], abs_tol=1e-6)
    assert len(scores.corpus) == 7
    assert scores.n_videos == 2
    assert set(scores.per_video) == {"0", "1"}


def test_nlgeval_single_example(shared_data: Path) -> None:
    """One video: corpus and per-video BLEU/ROUGE agree, and CIDEr-D on one document is 0."""
    example = _nlgeval(shared_data)[2]["single_example"]
    scores = score_captions(
        {"x": example["hyp"]}, {"x": example["refs"]}, tokenize="whitespace", metrics=NO_METEOR
    )
    # The file's values are truncated at their last digit, hence the extra 1e-6.
    expected = {k: v for k, v in example.items() if k.startswith(("Bleu", "ROUGE"))}
    _assert_matches(scores, expected, abs_tol=2e-6)
    assert scores.corpus["CIDEr"] == example["CIDEr_single_doc"] == 0.0
    assert scores.per_video["x"] == scores.corpus


@needs_java
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["s2vt_txt_refs", "sgn_csv_refs"])
def test_salstm_msvd_reproduces_pycocoevalcap(shared_data: Path, variant: str) -> None:
    predictions, references = _msvd(shared_data, variant)
    assert len(predictions) == len(references) == 670
    scores = score_captions(predictions, references)
    expected_file = shared_data / "eval" / "salstm_msvd" / "scores_pycocoevalcap.json"
    expected = json.loads(expected_file.read_text())
    _assert_matches(scores, expected[variant], abs_tol=1e-4)
    assert scores.n_videos == 670 and scores.n_missing == 0 and not scores.empty_predictions
    assert len(scores.per_video) == 670


# --- Sanitising and tokenising ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a man\u2028is singing", "a man is singing"),
        ("a man\u2029is singing\r\n", "a man is singing"),
        ("a\rb\x0bc\x0cd\x85e", "a b c d e"),
        ("\ufeffa dog\ufeffruns", "a dog runs"),
        ("a ||| b|||c", "a b c"),
        ("a\x00b\tc   d", "a b c d"),
        ("  \r\n\ufeff ", ""),
        ("Café, naïve!", "Café, naïve!"),  # letters and punctuation are the tokenizer's job
    ],
)
def test_sanitise_caption(raw: str, clean: str) -> None:
    assert sanitise_caption(raw) == clean


@needs_java
def test_tokenize_ptb_matches_pycocoevalcap() -> None:
    captions = ["A man is slicing a tomato.", "The girl (aged 5) can't swim -- sadly!", "Two dogs"]
    ours = tokenize_ptb(captions)
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert ours == [theirs[i][0] for i in range(len(captions))]
    # pycocoevalcap's filter lists "-LRB-" but the tokenizer lower-cases first: brackets stay.
    assert ours[1] == "the girl -lrb- aged 5 -rrb- ca n't swim sadly"


@needs_java
def test_tokenize_ptb_keeps_blank_captions_in_place() -> None:
    assert tokenize_ptb(["", "A Dog!", "   ", "..."]) == ["", "a dog", "", ""]


@needs_java
@pytest.mark.parametrize("breaker", ["\n", "\r", "\u2028", "\u2029", "\x0b"])
def test_tokenize_ptb_count_mismatch_raises(breaker: str) -> None:
    """An unsanitised line break makes the tokenizer return one line too many: caught."""
    with pytest.raises(MetricsError, match="returned 3 lines for 2 captions"):
        tokenize_ptb([f"a man{breaker}sings", "a dog barks"])


NASTY = {
    "v1": ("a man\u2028is playing a guitar", ["a man plays a guitar\r\n", "someone\r is playing"]),
    "v2": ("\ufeffa woman ||| is cooking", ["a woman cooks|||food", "a lady is cooking\u2029"]),
    "v3": ("", ["a cat is sleeping", "\ufeffa cat sleeps"]),
    "v4": ("a dog is running", ["a dog runs", "the dog is running fast"]),
}
CLEAN = {
    "v1": ("a man is playing a guitar", ["a man plays a guitar", "someone is playing"]),
    "v2": ("a woman is cooking", ["a woman cooks food", "a lady is cooking"]),
    "v3": (EMPTY_PREDICTION, ["a cat is sleeping", "a cat sleeps"]),
    "v4": ("a dog is running", ["a dog runs", "the dog is running fast"]),
}


def _assert_same_per_video(ours: dict, theirs: dict, abs_tol: float) -> None:
    assert ours.keys() == theirs.keys()
    for video, values in ours.items():
        assert values == pytest.approx(theirs[video], abs=abs_tol), video


def _split(table: dict) -> tuple[dict[str, str], dict[str, list[str]]]:
    return {v: p for v, (p, _) in table.items()}, {v: r for v, (_, r) in table.items()}


@needs_java
def test_nasty_captions_score_like_clean_ones() -> None:
    nasty = score_captions(*_split(NASTY), metrics=NO_METEOR)
    clean = score_captions(*_split(CLEAN), metrics=NO_METEOR)
    _assert_same_per_video(nasty.per_video, clean.per_video, abs_tol=1e-12)
    assert nasty.corpus == pytest.approx(clean.corpus, abs=1e-12)
    assert nasty.empty_predictions == ("v3",) and clean.empty_predictions == ()
    assert all(value == pytest.approx(0.0, abs=1e-4) for value in nasty.per_video["v3"].values())
    assert nasty.per_video["v4"]["BLEU-1"] == pytest.approx(100.0)
    # The hazard is real: pycocoevalcap's own tokenizer shifts captions on this input.
    naive = PTBTokenizer().tokenize(
        {v: [{"caption": c} for c in refs] for v, (_, refs) in NASTY.items()}
    )
    assert naive["v4"] != ["a dog runs", "the dog is running fast"]


@needs_java
@pytest.mark.slow
def test_nasty_captions_with_meteor_score_like_clean_ones() -> None:
    """One METEOR start: each nasty video scored beside its clean twin in the same corpus.

    Every per-video score, CIDEr-D's included (the twins add the same document frequencies),
    must equal the twin's; a desync would pair captions with other videos' references.
    """
    predictions, references = _split({f"nasty-{v}": row for v, row in NASTY.items()})
    clean_predictions, clean_references = _split({f"clean-{v}": row for v, row in CLEAN.items()})
    scores = score_captions(predictions | clean_predictions, references | clean_references)
    for video in NASTY:
        assert scores.per_video[f"nasty-{video}"] == pytest.approx(
            scores.per_video[f"clean-{video}"], abs=1e-9
        )
    assert scores.per_video["nasty-v1"]["METEOR"] > 10.0


def test_whitespace_mode_sanitises_too() -> None:
    """No PTB tokenizer, same guarantees: '|||' and line breaks cannot reach the scorers."""
    nasty = score_captions(*_split(NASTY), tokenize="whitespace", metrics=NO_METEOR)
    clean = score_captions(*_split(CLEAN), tokenize="whitespace", metrics=NO_METEOR)
    _assert_same_per_video(nasty.per_video, clean.per_video, abs_tol=1e-12)


def test_run_scorers_refuses_unsanitised_text() -> None:
    with pytest.raises(MetricsError, match="unsanitised"):
        run_scorers({"a": "x ||| y"}, {"a": ["x y"]}, ["BLEU"])


@pytest.mark.parametrize("blank", ["   ", "\r\n\ufeff"])
def test_blank_reference_raises(blank: str) -> None:
    with pytest.raises(MetricsError, match=r"'b': reference 1 .* blank after sanitising"):
        score_captions({"a": "x", "b": "y"}, {"a": ["x"], "b": ["y", blank]}, tokenize="whitespace")


@needs_java
def test_reference_blank_after_ptb_raises() -> None:
    with pytest.raises(MetricsError, match="blank after tokenising"):
        score_captions({"a": "a dog"}, {"a": ["a dog", "? ! ..."]}, metrics=NO_METEOR)


# --- Missing and unknown videos, bad input ------------------------------------------------------

REFERENCES = {
    "v1": ["a man is singing", "someone sings a song"],
    "v2": ["a cat plays with a ball", "a kitten is playing"],
    "v3": ["people are dancing", "a group dances on a stage"],
}


def test_missing_prediction_raises_unless_allowed() -> None:
    predictions = {"v1": "a man is singing a song", "v3": "people dance"}
    with pytest.raises(MetricsError, match=r"1 of 3 reference videos have no prediction: 'v2'"):
        score_captions(predictions, REFERENCES, tokenize="whitespace", metrics=NO_METEOR)
    with pytest.raises(MetricsError, match=r"score-captions --allow-missing, or allow_missing"):
        score_captions(predictions, REFERENCES, tokenize="whitespace", metrics=NO_METEOR)
    scores = score_captions(
        predictions, REFERENCES, tokenize="whitespace", metrics=NO_METEOR, allow_missing=True
    )
    assert scores.missing == ("v2",) and scores.n_missing == 1 and scores.n_videos == 2
    assert set(scores.per_video) == {"v1", "v3"}
    # The corpus is over the predicted videos only, exactly as if v2 were not in the test set.
    subset = {video: REFERENCES[video] for video in predictions}
    alone = score_captions(predictions, subset, tokenize="whitespace", metrics=NO_METEOR)
    assert scores.corpus == alone.corpus
    assert scores.to_dict()["missing"] == ["v2"]


def test_prediction_for_unknown_video_raises() -> None:
    predictions = {"v1": "a", "v2": "b", "v3": "c", "v9": "d"}
    with pytest.raises(MetricsError, match="1 predictions for videos without references: 'v9'"):
        score_captions(predictions, REFERENCES, tokenize="whitespace", metrics=NO_METEOR)


@pytest.mark.parametrize(
    ("predictions", "references", "options", "message"),
    [
        ({"a": "x"}, {"a": "x y"}, {}, "non-empty list of strings"),
        ({"a": "x"}, {"a": []}, {}, "non-empty list of strings"),
        ({"a": ["x"]}, {"a": ["x"]}, {}, "must be one string"),
        ({"a": "x"}, {}, {}, "no reference videos"),
        ({}, {"a": ["x"]}, {"allow_missing": True}, "none of the reference videos"),
        ({"a": "x"}, {"a": ["x"]}, {"metrics": ("BLEU", "SPICE")}, "metrics must be"),
        ({"a": "x"}, {"a": ["x"]}, {"tokenize": "nltk"}, "tokenize must be"),
        ({"a": "x"}, {"a": ["x"]}, {"timeout_s": 0}, "timeout_s must be positive"),
    ],
)
def test_bad_input_raises(predictions, references, options, message) -> None:
    options = {"tokenize": "whitespace", "metrics": NO_METEOR} | options
    with pytest.raises(MetricsError, match=message):
        score_captions(predictions, references, **options)


def test_scores_round_trip_through_json() -> None:
    predictions = {"v1": "a man is singing", "v2": "", "v3": "people are dancing"}
    scores = score_captions(predictions, REFERENCES, tokenize="whitespace", metrics=("BLEU",))
    summary = json.loads(json.dumps(scores.to_dict()))
    assert summary["corpus"] == scores.corpus and set(summary["corpus"]) == {
        "BLEU-1",
        "BLEU-2",
        "BLEU-3",
        "BLEU-4",
    }
    assert summary["n_videos"] == 3 and summary["empty_predictions"] == ["v2"]
    assert summary["per_video"]["v1"]["BLEU-1"] == pytest.approx(100.0)
    assert summary["scale"] == 100.0


# --- Java ----------------------------------------------------------------------------------------


def _fake_java(folder: Path, banner: str) -> None:
    script = folder / "java"
    script.write_text(f"#!/bin/sh\necho '{banner}' >&2\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@needs_java
def test_check_java_reports_installed_version() -> None:
    version = check_java()
    assert int(version.split(".")[0]) >= 17


def test_missing_java_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MetricsError, match=r"java not found.*METEOR and the PTB tokenizer need"):
        check_java()
    # Checked before any work: even input that is wrong in other ways fails on Java first.
    with pytest.raises(MetricsError, match=r"need Java 17\+"):
        score_captions({"zzz": "x"}, {"a": ["x"]})
    # Without METEOR and the PTB tokenizer, Java is not needed.
    scores = score_captions({"a": "x y"}, {"a": ["x y"]}, tokenize="whitespace", metrics=("BLEU",))
    assert scores.corpus["BLEU-1"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("banner", "version"),
    [
        ('openjdk version "11.0.2" 2019-01-15', None),
        ('java version "1.8.0_292"', None),
        ('openjdk version "21.0.1" 2023-10-17', "21.0.1"),
        ('openjdk version "17-ea"', "17-ea"),
    ],
)
def test_check_java_version(tmp_path: Path, monkeypatch, banner: str, version) -> None:
    _fake_java(tmp_path, banner)
    monkeypatch.setenv("PATH", str(tmp_path))
    if version is None:
        with pytest.raises(MetricsError, match=r"is Java .*need Java 17\+"):
            check_java()
    else:
        assert check_java() == version


# --- Hangs and crashes ---------------------------------------------------------------------------


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in a process group, from /proc."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # exited while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat_file.parent.name))
    return members


def _own_session_children() -> list[int]:
    """Our children that lead their own process group (the scorer worker)."""
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pid = int(stat_file.parent.name)
        if int(fields[1]) == os.getpid() and int(fields[2]) == pid:
            children.append(pid)
    return children


@needs_java
@pytest.mark.skipif(not HAS_PROC or sys.platform != "linux", reason="needs Linux /proc")
def test_hung_scorer_is_killed_with_its_java() -> None:
    """A worker that never returns: killed at the timeout, METEOR's Java with it, clear error."""
    outcome: dict = {}

    def score() -> None:
        started = time.monotonic()
        try:
            run_scorers({"a": "x y"}, {"a": ["x y"]}, ["METEOR"], timeout_s=4, fault="hang")
        except MetricsError as error:
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=score)
    thread.start()
    largest_group = 0
    while thread.is_alive():  # watch the worker's group while it hangs: it holds a Java too
        for worker in _own_session_children():
            largest_group = max(largest_group, len(_group_members(worker)))
        time.sleep(0.2)
    thread.join()
    assert largest_group >= 2, "the hung worker should have started METEOR's Java"
    assert "did not finish 1 videos within 4 s" in str(outcome["error"])
    assert outcome["seconds"] < 10
    worker = int(str(outcome["error"]).split("worker ")[1].split()[0])
    deadline = time.monotonic() + 5
    while _group_members(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_members(worker) == []


@needs_java
def test_scorer_exception_is_reported_and_the_worker_exits() -> None:
    """The state in which pycocoevalcap hangs at exit (METEOR's lock held) still ends at once."""
    started = time.monotonic()
    with pytest.raises(MetricsError, match=r"exit 1.*injected scorer fault"):
        run_scorers({"a": "x y"}, {"a": ["x y"]}, ["METEOR"], timeout_s=20, fault="raise")
    assert time.monotonic() - started < 15
