"""Child process that runs the pycocoevalcap scorers for ``astar.pipelines.metrics``.

    python -m astar.pipelines._scorer_worker REQUEST.json RESULT.json

The parent (``metrics.run_scorers``) starts this in its own process group and kills the whole
group, METEOR's Java process included, if it runs past the timeout. That is why the scorers live
here and not in the caller: pycocoevalcap's ``Meteor`` talks to a Java subprocess over pipes it
never drains (stderr), so it can block forever, and after an exception inside ``compute_score``
its lock stays held and ``Meteor.__del__`` blocks once the object is dropped or at exit. This
process therefore stops METEOR's Java itself, frees that lock, and leaves through ``os._exit``.

REQUEST holds already tokenised text: ``{"metrics": [...], "ids": [...], "predictions": [...],
"references": [[...], ...], "fault": null}`` (lists aligned with ``ids``). RESULT receives
``{"corpus": {name: value}, "per_video": {name: [value per id]}}`` on the 0..1 scale pycocoevalcap
uses, or ``{"error": "..."}`` with exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

# Test hooks (the request's "fault"): prove the parent copes with a scorer that never returns
# and with one that fails in the state that makes pycocoevalcap hang at exit.
FAULT_HANG = "hang"
FAULT_RAISE = "raise"

BLEU_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")


def _python_scores(
    metric: str, gts: dict[str, list[str]], res: dict[str, list[str]]
) -> dict[str, tuple[float, list[float]]]:
    """Corpus score and per-video scores of one pure-Python scorer, keyed by reported name."""
    if metric == "BLEU":
        corpus, per_video = Bleu(4).compute_score(gts, res, verbose=0)
        return {
            name: (float(corpus[n]), [float(s) for s in per_video[n]])
            for n, name in enumerate(BLEU_NAMES)
        }
    scorer = Rouge() if metric == "ROUGE_L" else Cider()
    corpus, per_video = scorer.compute_score(gts, res)
    return {metric: (float(corpus), [float(s) for s in per_video])}


def _stop_meteor(meteor: Meteor) -> None:
    """Kill METEOR's Java, and free the lock a failed ``compute_score`` leaves held.

    ``Meteor.__del__`` takes that lock, and runs as soon as the object is dropped (here, when the
    exception's traceback is cleared): with the lock still held it would block forever.
    """
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    if meteor.lock.locked():
        meteor.lock.release()


def score(request: dict) -> dict:
    """Run the requested scorers; METEOR's Java starts first so its start-up overlaps the rest."""
    ids = request["ids"]
    gts = dict(zip(ids, request["references"], strict=True))
    res = {vid: [caption] for vid, caption in zip(ids, request["predictions"], strict=True)}
    metrics = request["metrics"]
    meteor = Meteor() if "METEOR" in metrics else None
    try:
        if request.get("fault") == FAULT_HANG:
            time.sleep(10_000)
        if request.get("fault") == FAULT_RAISE:
            if meteor is not None:
                meteor.lock.acquire()  # the state compute_score leaves behind when it raises
            raise RuntimeError("injected scorer fault")
        results: dict[str, tuple[float, list[float]]] = {}
        for metric in metrics:
            if metric != "METEOR":
                results.update(_python_scores(metric, gts, res))
        if meteor is not None:
            corpus, per_video = meteor.compute_score(gts, res)
            results["METEOR"] = (float(corpus), [float(s) for s in per_video])
    finally:
        if meteor is not None:
            _stop_meteor(meteor)
    return {
        "corpus": {name: value for name, (value, _) in results.items()},
        "per_video": {name: values for name, (_, values) in results.items()},
    }


def main(argv: list[str]) -> int:
    request_path, result_path = (Path(arg) for arg in argv)
    try:
        result = score(json.loads(request_path.read_text(encoding="utf-8")))
        status = 0
    except Exception as error:  # reported to the parent, which raises MetricsError with it
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
        status = 1
    result_path.write_text(json.dumps(result), encoding="utf-8")
    return status


if __name__ == "__main__":
    exit_status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_status)  # skip finalisers: a Meteor left mid-call would block a normal exit
