"""Evaluation time: score_captions against pycocoevalcap alone on the MSVD test set.

    python benchmarks/bench_metrics.py [--data ../shared/data] [--repeats 3]

Input: the 670 SA-LSTM predictions of ../shared/data/eval/salstm_msvd against the S2VT MSVD test
references (27,763 sentences). "pycocoevalcap alone" is the plain coco-caption pipeline in this
process: PTBTokenizer on references and predictions, then Bleu(4), Meteor, Rouge and Cider
``compute_score`` on that tokenised input. score_captions adds Java and input checks,
sanitising, the line-count check and a killable child process for the scorers. Runs alternate
between the two so a busy machine slows both alike; medians are printed with their ratio
(target <= 1.2), and both must give the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from astar.pipelines.metrics import score_captions

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
OUR_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr")


def load_msvd(data: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """SA-LSTM predictions and S2VT references, keyed by vidN."""
    mapping_file = data / "msvd" / "youtube_mapping.txt"
    mapping = dict(line.split() for line in mapping_file.open() if line.strip())
    predictions = {}
    for line in (data / "eval" / "salstm_msvd" / "MSVD_test.tsv").open(encoding="utf-8"):
        clip, prediction, _ = line.rstrip("\n").split("\t")
        predictions[mapping[clip]] = prediction
    references: dict[str, list[str]] = {}
    for line in (data / "msvd" / "sents_test_lc_nopunc.txt").open(encoding="utf-8"):
        video, caption = line.rstrip("\n").split("\t", 1)
        references.setdefault(video, []).append(caption)
    return predictions, references


def pycocoevalcap_alone(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> dict[str, float]:
    """The usual coco-caption evaluation loop, x 100."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({v: [{"caption": c} for c in refs] for v, refs in references.items()})
    res = tokenizer.tokenize({v: [{"caption": predictions[v]}] for v in references})
    # As pycocoevalcap's COCOEvalCap: all scorers built first (METEOR's Java starts here).
    scorers = [Bleu(4), Meteor(), Rouge(), Cider()]
    scores: list[float] = []
    for scorer in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its statistics
            score, _ = scorer.compute_score(gts, res)
        scores.extend(score if isinstance(score, list) else [score])
    del scorers  # Meteor.__del__ stops its Java process
    return {name: 100 * float(score) for name, score in zip(OUR_NAMES, scores, strict=True)}


def timed(run: Callable[[], dict[str, float]]) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    predictions, references = load_msvd(args.data)
    n_refs = sum(len(captions) for captions in references.values())
    print(f"{len(predictions)} predictions, {n_refs} references, {args.repeats} repeats (medians)")

    ours_s, theirs_s = [], []
    for _ in range(args.repeats):
        seconds, ours = timed(lambda: score_captions(predictions, references).corpus)
        ours_s.append(seconds)
        seconds, theirs = timed(lambda: pycocoevalcap_alone(predictions, references))
        theirs_s.append(seconds)
        worst = max(abs(ours[name] - theirs[name]) for name in OUR_NAMES)
        if worst > 1e-9:
            raise SystemExit(f"score_captions and pycocoevalcap disagree by {worst:g}")
    ours_median, theirs_median = statistics.median(ours_s), statistics.median(theirs_s)
    print("scores x 100: " + ", ".join(f"{name} {ours[name]:.2f}" for name in OUR_NAMES))
    print(f"pycocoevalcap alone: {theirs_median:6.2f} s  (runs: {_runs(theirs_s)})")
    print(f"score_captions:      {ours_median:6.2f} s  (runs: {_runs(ours_s)})")
    print(f"ratio score_captions / alone: {ours_median / theirs_median:.2f} (target <= 1.2)")


def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in seconds)


if __name__ == "__main__":
    main()
