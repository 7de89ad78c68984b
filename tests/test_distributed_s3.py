"""Data-parallel training from a store on object storage, launched as on several nodes.

Two ``torchrun`` agents (``--nnodes 2 --node-rank 0/1``, one worker each, static rendezvous on
127.0.0.1) are exactly the multi-node launch, on one machine. Their workers are subprocesses of
the agents: they reach the loopback S3 server (moto, in this pytest process) over 127.0.0.1 with
the credentials and endpoint they inherit in the environment, never on the command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_train import _free_port, _params

TIMEOUT_S = 300


@contextmanager
def _s3_requests(path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """Record the requests the loopback S3 server answers inside the block: on exit the list
    holds their (method, URL path). moto's recorder, pointed at ``path`` (by default it writes
    ``moto_recording`` in the working directory); monkeypatch switches it off again."""
    from moto.moto_api import recorder

    monkeypatch.setattr(recorder, "_location", str(path))
    monkeypatch.setattr(recorder, "_user_enabled", False)
    recorder.reset_recording()
    recorder.start_recording()
    requests: list[tuple[str, str]] = []
    try:
        yield requests
    finally:
        recorder.stop_recording()
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        requests.append((entry["method"], urlsplit(entry["url"]).path))


def _layers_read(requests: list[tuple[str, str]], bucket: str) -> set[str]:
    """The layers whose chunk objects (``partitions/P/ATTEMPT/LAYER/c.*``) were fetched."""
    prefix = f"/{bucket}/store/partitions/"
    return {
        path.split("/")[-2]
        for method, path in requests
        if method == "GET" and path.startswith(prefix) and path.rsplit("/", 1)[-1].startswith("c.")
    }


def _store_opens(requests: list[tuple[str, str]], bucket: str) -> int:
    """GETs of the store's root metadata: one per process that opened the store."""
    return requests.count(("GET", f"/{bucket}/store/zarr.json"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics/train.jsonl").open()]


def _wait_all(nodes: list[subprocess.Popen], timeout: float) -> list[int]:
    """Wait for every node; once one fails, or the time is up, kill the rest (a node whose peer
    died would otherwise wait out the rendezvous). Each is the leader of its own session, so
    its workers go with it."""
    deadline, failed_at = time.monotonic() + timeout, None
    while any(node.poll() is None for node in nodes):
        codes = [node.poll() for node in nodes]
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = time.monotonic()
        now = time.monotonic()
        if now > deadline or (failed_at is not None and now > failed_at + 30):
            for node in nodes:
                if node.poll() is None:
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait()
            break
        time.sleep(0.2)
    return [node.returncode for node in nodes]


@pytest.mark.slow  # three training processes and two torchrun agents
def test_two_nodes_training_from_s3_follow_the_single_process_trajectory(
    tiny_corpus, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    url = f"s3://{s3_bucket}/store"
    store, dataset = tiny_corpus(n_videos=8, store=url)
    assert str(store) == url
    # The features are on the S3 server only: no store, not even a zarr.json, on the local disk.
    assert not (dataset.parent / "store").exists()
    assert list(tmp_path.rglob("zarr.json")) == []

    common = ["--store", url, "--dataset", str(dataset), "--variant", "soft", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")  # inherited by every rank

    single = tmp_path / "single"
    params = _params(tmp_path, videos_per_batch=4, captions_per_video=2, max_steps=5)
    with _s3_requests(tmp_path / "single-requests.jsonl", monkeypatch) as single_requests:
        done = subprocess.run(
            [sys.executable, "-m", "astar.train.cli", *common, "--out", str(single)]
            + ["--params", str(params)],
            env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    soft_layers = {"pool2", "pool3", "pool4", "pool5", "fc7"}
    assert _layers_read(single_requests, s3_bucket) == soft_layers
    assert _store_opens(single_requests, s3_bucket) >= 1

    # Same global batch (2 videos per rank x 2 ranks); node 1's --out stands for its own disk.
    (tmp_path / "two").mkdir()
    params = _params(tmp_path / "two", videos_per_batch=2, captions_per_video=2, max_steps=5)
    outs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    port = str(_free_port())
    with _s3_requests(tmp_path / "nodes-requests.jsonl", monkeypatch) as node_requests:
        nodes: list[subprocess.Popen] = []
        try:
            for rank, out in enumerate(outs):
                command = (
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
                    + ["--node-rank", str(rank), "--nproc-per-node", "1"]
                    + ["--master-addr", "127.0.0.1", "--master-port", port]
                    + ["-m", "astar.train.cli", *common, "--out", str(out), "--params", str(params)]
                )
                with (tmp_path / f"node{rank}.log").open("w") as log:  # the child keeps its copy
                    node = subprocess.Popen(
                        command, env=env, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                nodes.append(node)
            codes = _wait_all(nodes, TIMEOUT_S)
        finally:  # a launch that failed halfway leaves no agent behind
            _wait_all(nodes, 0)
    output = {rank: (tmp_path / f"node{rank}.log").read_text()[-3000:] for rank in (0, 1)}
    assert codes == [0, 0], output
    # Both workers opened the store on the S3 server and read the features from it (the pytest
    # process only waited): twice the single process's opens, every layer's chunks fetched.
    assert _store_opens(node_requests, s3_bucket) == 2 * _store_opens(single_requests, s3_bucket)
    assert _layers_read(node_requests, s3_bucket) == soft_layers

    one, two = _losses(single), _losses(outs[0])
    assert len(one) == len(two) == 5
    assert one[0] != one[-1]  # training moved
    assert two == pytest.approx(one, rel=1e-4)
    config = json.loads((outs[0] / "config.json").read_text())
    assert config["world_size"] == 2 and config["store"] == url
    # Rank 0 alone writes the run directory: node 1's is created, and left empty.
    assert outs[1].is_dir() and list(outs[1].iterdir()) == []
    assert list(tmp_path.rglob("zarr.json")) == []  # still no features on the local disk
