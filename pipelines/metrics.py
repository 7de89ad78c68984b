"""COCO caption metrics that cannot hang or lie: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D.

The numbers come from pycocoevalcap 1.2's own scorers (the coco-caption code). Its ``Cider`` class
is CIDEr-D as in coco-caption (clipped n-gram counts, Gaussian length penalty with sigma 6, x 10),
so ``"CIDEr"`` below is the CIDEr-D of the papers' tables. Scores are reported x 100, for the
corpus and per video; a per-video CIDEr-D uses document frequencies from all scored references.

What this module adds around the scorers, and why:

- Java (17+) is checked with ``java -version`` before any work when METEOR or the PTB tokenizer
  will run, so a missing Java is one clear error instead of a broken pipe deep in a scorer.
- Captions are sanitised first (``sanitise_caption``): control characters, the byte-order mark,
  Unicode line and paragraph separators become spaces and METEOR's field separator ``|||`` is
  removed. The PTB tokenizer starts a new line at ``\\r``, U+2028, U+2029, ``\\v`` and ``\\f``, so
  one such caption would shift every later caption onto the wrong video; and a ``|||`` inside a
  reference adds a phantom reference in METEOR's protocol.
- The PTB tokenizer (the Stanford CoreNLP 3.4.1 jar shipped with pycocoevalcap, with the same
  flags and punctuation filter as its ``PTBTokenizer``) runs here with a timeout, reading a
  private temporary file, and the number of lines it returns is checked against the input.
- The scorers run in a child process (``_scorer_worker``) leading its own process group; past the
  timeout the whole group, METEOR's Java included, is killed and a ``MetricsError`` raised.
- An empty prediction (a model may end a caption at once) is scored as the placeholder token
  ``EMPTY_PREDICTION``, which matches no reference, and is listed in ``Scores.empty_predictions``.
  An empty reference is a dataset error and raises.
- A reference video without a prediction raises unless ``allow_missing=True``; then the corpus is
  scored over the predicted videos only and the others are listed in ``Scores.missing``. A
  prediction for a video with no references raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pycocoevalcap.tokenizer.ptbtokenizer as coco_ptb

from astar.pipelines._scorer_worker import BLEU_NAMES, FAULT_HANG, FAULT_RAISE
from astar.pipelines.text import sanitise_caption

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EMPTY_PREDICTION",
    "METRICS",
    "TABLE_METRICS",
    "MetricsError",
    "Scores",
    "check_java",
    "run_scorers",
    "sanitise_caption",
    "score_captions",
    "tokenize_ptb",
    "tokenize_whitespace",
]

METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
TABLE_METRICS = ("BLEU-4", "METEOR", "ROUGE_L", "CIDEr")  # the columns of the paper's tables
# Reported names per requested metric, in report order.
METRIC_NAMES = {
    "BLEU": BLEU_NAMES,
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
}
TOKENIZERS = ("ptb", "whitespace")
MIN_JAVA_MAJOR = 17
DEFAULT_TIMEOUT_S = 600.0
SCALE = 100.0
# Scored in place of an empty prediction: one lower-case alphanumeric token, so it survives
# METEOR's normalisation unchanged and matches no English reference (checked when used).
EMPTY_PREDICTION = "xxempty"
# Last line fed to the PTB tokenizer: the output must end with it, so a lost or extra line
# anywhere shows up as a count mismatch even when the final caption is blank.
_PTB_SENTINEL = "xxendofcaptions"
_WORKER_MODULE = f"{__package__}._scorer_worker"

# Anything that would break a line of the METEOR or PTB protocols once tokenised.
_PROTOCOL_BREAKER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff]|\|\|\|")
_JAVA_VERSION = re.compile(r'version "([^"]+)"')


class MetricsError(Exception):
    """Captions, references, Java or a scorer made a trustworthy score impossible."""


@dataclass(frozen=True)
class Scores:
    """Caption metrics x 100 (BLEU-1..4, METEOR, ROUGE_L, CIDEr = CIDEr-D)."""

    corpus: dict[str, float]  # metric name -> corpus-level score x 100
    per_video: dict[str, dict[str, float]]  # video id -> metric name -> score x 100
    n_videos: int  # videos scored, i.e. reference videos that have a prediction
    missing: tuple[str, ...] = ()  # reference videos without a prediction (allow_missing only)
    empty_predictions: tuple[str, ...] = ()  # scored as EMPTY_PREDICTION
    tokenize: str = "ptb"  # "ptb" (Stanford PTB tokenizer) or "whitespace"
    metrics: tuple[str, ...] = METRICS  # metric groups computed

    @property
    def n_missing(self) -> int:
        return len(self.missing)

    def to_dict(self) -> dict:
        """JSON-ready summary; ``scale`` says the numbers are x 100."""
        return {
            "corpus": dict(self.corpus),
            "per_video": {video: dict(values) for video, values in self.per_video.items()},
            "n_videos": self.n_videos,
            "n_missing": self.n_missing,
            "missing": list(self.missing),
            "n_empty_predictions": len(self.empty_predictions),
            "empty_predictions": list(self.empty_predictions),
            "tokenize": self.tokenize,
            "metrics": list(self.metrics),
            "scale": SCALE,
            "cider_variant": "CIDEr-D (pycocoevalcap Cider)",
        }


# --- Java -------------------------------------------------------------------------------------


def check_java(*, min_major: int = MIN_JAVA_MAJOR, timeout_s: float = 30.0) -> str:
    """Return the version ``java -version`` reports, or raise MetricsError if it is unusable."""
    need = f"METEOR and the PTB tokenizer need Java {min_major}+"
    java = shutil.which("java")
    if java is None:
        raise MetricsError(
            f"java not found on PATH: {need} (e.g. apt-get install openjdk-17-jre-headless)"
        )
    try:
        done = subprocess.run([java, "-version"], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise MetricsError(f"`{java} -version` did not answer within {timeout_s:g} s") from None
    report = (done.stderr + done.stdout).decode("utf-8", errors="replace").strip()
    match = _JAVA_VERSION.search(report)
    if done.returncode != 0 or match is None:
        raise MetricsError(f"`{java} -version` failed (exit {done.returncode}): {report[:300]!r}")
    version = match[1]
    parts = re.match(r"(\d+)(?:\.(\d+))?", version)
    if parts is None:
        raise MetricsError(f"cannot read the Java version {version!r} from {java}; {need}")
    # Java 8 and older report "1.8.0_292".
    major = int(parts[2] or 0) if parts[1] == "1" else int(parts[1])
    if major < min_major:
        raise MetricsError(f"{java} is Java {version}; {need}")
    return version


# --- Sanitising and tokenising ------------------------------------------------------------------


def tokenize_whitespace(captions: Sequence[str]) -> list[str]:
    """Whitespace tokens, case kept (as nlg-eval's metrics without the PTB tokenizer)."""
    return [" ".join(caption.split()) for caption in captions]


def tokenize_ptb(captions: Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """pycocoevalcap's PTB tokenisation (lower-cased, punctuation dropped), one output per input.

    Blank captions are not sent and come back as ``""``. Captions must be single lines
    (``sanitise_caption``); a caption the tokenizer splits or merges makes the output line count
    differ from the input and raises MetricsError instead of pairing captions with wrong videos.
    """
    sent = [index for index, caption in enumerate(captions) if caption.strip()]
    lines = [captions[index] for index in sent] + [_PTB_SENTINEL]
    jar = Path(coco_ptb.__file__).with_name(coco_ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="astar-ptb-") as tmp:
        text_path = Path(tmp) / "captions.txt"
        text_path.write_text("\n".join(lines), encoding="utf-8")
        command = [
            "java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines", "-lowerCase", "-encoding", "utf-8", str(text_path),
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, timeout=timeout_s)
        except FileNotFoundError:
            raise MetricsError("java not found on PATH: the PTB tokenizer needs Java") from None
        except subprocess.TimeoutExpired:
            raise MetricsError(
                f"the PTB tokenizer did not finish {len(sent)} captions within {timeout_s:g} s"
            ) from None
    if done.returncode != 0:
        stderr = done.stderr.decode("utf-8", errors="replace").strip()
        raise MetricsError(f"the PTB tokenizer failed (exit {done.returncode}): {stderr[-500:]}")
    output = done.stdout.decode("utf-8").rstrip("\n").split("\n")
    if len(output) != len(lines) or output[-1].strip() != _PTB_SENTINEL:
        raise MetricsError(
            f"the PTB tokenizer returned {len(output) - 1} lines for {len(sent)} captions: a "
            "caption holds a line break, so captions would be paired with the wrong videos"
        )
    tokenised = [""] * len(captions)
    for index, line in zip(sent, output[:-1], strict=True):
        # Exactly pycocoevalcap's PTBTokenizer post-processing, so the scores match its own.
        words = line.rstrip().split(" ")
        tokenised[index] = " ".join(word for word in words if word not in coco_ptb.PUNCTUATIONS)
    return tokenised


# --- Scorers in a child process -----------------------------------------------------------------


def _kill_group(worker: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (METEOR's Java with it) and reap the worker."""
    with contextlib.suppress(ProcessLookupError):  # the group may have gone already
        os.killpg(worker.pid, signal.SIGKILL)
    worker.communicate()


def run_scorers(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = METRICS,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    fault: str | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """pycocoevalcap's scorers on tokenised captions, in a child process killed after timeout_s.

    Returns ``(corpus, per_video)`` on pycocoevalcap's own 0..1 scale (CIDEr-D 0..10), per video
    keyed by id then metric name. ``references`` fixes the video order; ``predictions`` must have
    the same ids. ``fault`` is a test hook: ``"hang"`` makes the worker sleep after starting
    METEOR, ``"raise"`` makes it fail with METEOR's lock held (pycocoevalcap's hang at exit).
    """
    ids = list(references)
    if set(predictions) != set(ids):
        raise MetricsError("run_scorers needs exactly one prediction per reference video")
    texts = [predictions[video] for video in ids] + [r for v in ids for r in references[v]]
    broken = next((text for text in texts if _PROTOCOL_BREAKER.search(text)), None)
    if broken is not None:
        raise MetricsError(f"unsanitised caption (line break or '|||'): {broken!r}")
    if fault not in (None, FAULT_HANG, FAULT_RAISE):
        raise MetricsError(f"unknown fault hook {fault!r}")
    request = {
        "metrics": list(metrics),
        "ids": ids,
        "predictions": [predictions[video] for video in ids],
        "references": [list(references[video]) for video in ids],
        "fault": fault,
    }
    with tempfile.TemporaryDirectory(prefix="astar-scorers-") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request), encoding="utf-8")
        command = [sys.executable, "-m", _WORKER_MODULE, str(request_path), str(result_path)]
        worker = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a kill reaches METEOR's Java
        )
        try:
            _, stderr = worker.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(worker)
            raise MetricsError(
                f"the scorers ({', '.join(metrics)}) did not finish {len(ids)} videos within "
                f"{timeout_s:g} s; worker {worker.pid} and its Java processes were killed"
            ) from None
        except BaseException:  # e.g. Ctrl-C: leave no scorer behind, then re-raise
            _kill_group(worker)
            raise
        result = json.loads(result_path.read_text("utf-8")) if result_path.exists() else {}
    if worker.returncode != 0 or "error" in result:
        reason = result.get("error") or stderr.decode("utf-8", errors="replace").strip()[-800:]
        raise MetricsError(f"the scorer worker failed (exit {worker.returncode}): {reason}")
    corpus = {name: float(value) for name, value in result["corpus"].items()}
    per_video = {
        video: {name: float(values[index]) for name, values in result["per_video"].items()}
        for index, video in enumerate(ids)
    }
    return corpus, per_video


# --- The public entry point ---------------------------------------------------------------------


def _first(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _remaining(deadline: float, timeout_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MetricsError(f"scoring ran out of its {timeout_s:g} s timeout")
    return left


def _check_options(tokenize: str, metrics: Sequence[str], timeout_s: float) -> tuple[str, ...]:
    if tokenize not in TOKENIZERS:
        raise MetricsError(f"tokenize must be one of {TOKENIZERS}, got {tokenize!r}")
    unknown = [metric for metric in metrics if metric not in METRIC_NAMES]
    if unknown or not metrics:
        raise MetricsError(f"metrics must be a non-empty subset of {METRICS}, got {metrics!r}")
    if not timeout_s > 0:
        raise MetricsError(f"timeout_s must be positive, got {timeout_s!r}")
    return tuple(dict.fromkeys(metrics))


def _scored_ids(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    allow_missing: bool,
) -> tuple[list[str], list[str]]:
    """Ids to score (reference order) and reference ids without a prediction; check the types."""
    if not references:
        raise MetricsError("no reference videos to score against")
    for video, captions in references.items():
        if isinstance(captions, str) or not captions:
            raise MetricsError(f"video {video!r}: references must be a non-empty list of strings")
        if not all(isinstance(caption, str) for caption in captions):
            raise MetricsError(f"video {video!r}: every reference must be a string")
    for video, caption in predictions.items():
        if not isinstance(caption, str):
            raise MetricsError(f"video {video!r}: a prediction must be one string, not {caption!r}")
    unknown = sorted(set(predictions) - set(references))
    if unknown:
        raise MetricsError(
            f"{len(unknown)} predictions for videos without references: {_first(unknown)}"
        )
    missing = [video for video in references if video not in predictions]
    if missing and not allow_missing:
        raise MetricsError(
            f"{len(missing)} of {len(references)} reference videos have no prediction: "
            f"{_first(missing)} (score-captions --allow-missing, or allow_missing=True, scores "
            "the rest and lists these)"
        )
    ids = [video for video in references if video in predictions]
    if not ids:
        raise MetricsError("none of the reference videos has a prediction")
    return ids, missing


def _check_references_not_blank(
    ids: Sequence[str], groups: Sequence[Sequence[str]], references: Mapping, stage: str
) -> None:
    for video, group in zip(ids, groups, strict=True):
        for index, caption in enumerate(group):
            if not caption:
                original = references[video][index]
                raise MetricsError(f"video {video!r}: reference {index} {original!r} is {stage}")


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    tokenize: str = "ptb",
    metrics: Sequence[str] = METRICS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    allow_missing: bool = False,
) -> Scores:
    """Score one caption per video against its references; raise MetricsError rather than guess.

    ``tokenize="ptb"`` is the coco-caption protocol (Stanford PTB tokenizer, lower-cased,
    punctuation dropped) used for the papers' numbers; ``"whitespace"`` splits on whitespace only
    and keeps case (nlg-eval's protocol). ``timeout_s`` bounds tokenising and scoring together.
    See the module docstring for sanitising, empty captions and missing predictions.
    """
    deadline = time.monotonic() + timeout_s
    metrics = _check_options(tokenize, metrics, timeout_s)
    if tokenize == "ptb" or "METEOR" in metrics:
        check_java(timeout_s=min(30.0, timeout_s))
    ids, missing = _scored_ids(predictions, references, allow_missing)

    hypotheses = [sanitise_caption(predictions[video]) for video in ids]
    groups = [[sanitise_caption(caption) for caption in references[video]] for video in ids]
    _check_references_not_blank(ids, groups, references, "blank after sanitising")
    flat = hypotheses + [caption for group in groups for caption in group]
    if tokenize == "ptb":
        tokens = tokenize_ptb(flat, timeout_s=_remaining(deadline, timeout_s))
    else:
        tokens = tokenize_whitespace(flat)
    hypotheses, rest = tokens[: len(ids)], iter(tokens[len(ids) :])
    groups = [[next(rest) for _ in group] for group in groups]
    _check_references_not_blank(ids, groups, references, "blank after tokenising")

    empty = [video for video, hypothesis in zip(ids, hypotheses, strict=True) if not hypothesis]
    if empty:
        if any(EMPTY_PREDICTION in caption.split(" ") for group in groups for caption in group):
            raise MetricsError(f"a reference holds the empty-prediction token {EMPTY_PREDICTION!r}")
        hypotheses = [hypothesis or EMPTY_PREDICTION for hypothesis in hypotheses]

    corpus, per_video = run_scorers(
        dict(zip(ids, hypotheses, strict=True)),
        dict(zip(ids, groups, strict=True)),
        metrics,
        timeout_s=_remaining(deadline, timeout_s),
    )
    names = [name for metric in metrics for name in METRIC_NAMES[metric]]
    return Scores(
        corpus={name: SCALE * corpus[name] for name in names},
        per_video={
            video: {name: SCALE * values[name] for name in names}
            for video, values in per_video.items()
        },
        n_videos=len(ids),
        missing=tuple(missing),
        empty_predictions=tuple(empty),
        tokenize=tokenize,
        metrics=metrics,
    )
