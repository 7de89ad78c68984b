"""The checksum a video's values are stored with and checked against.

Its own module because both sides need it and neither may import the other: the writer records
it at staging (:mod:`astar.store.writer`), the readers compare it on every read
(:mod:`astar.store.partition`).

New videos are recorded with XXH3-128 (``xxh3:<32 hex digits>``): a checksum guards against
lost, truncated or flipped bytes, not against an adversary, and at about 12 GB/s against
sha256's 1.3 GB/s (one core of the 2-core AMD EPYC these figures come from) it no longer
dominates a read (``benchmarks/bench_store_read.py``). Stores written before record sha256
(64 bare hex digits), which are still checked as such.
"""

from __future__ import annotations

import hashlib

import numpy as np
import xxhash

XXH3 = "xxh3"  # the algorithm of new checksums
ALGORITHMS = ("xxh3", "sha256")


def algorithm_of(digest: str) -> str:
    """``xxh3`` for ``xxh3:<hex>``, ``sha256`` for 64 bare hex digits (older stores)."""
    return XXH3 if digest.startswith(f"{XXH3}:") else "sha256"


def checksum(array: np.ndarray, algorithm: str = XXH3) -> str:
    """Checksum of an array's values as little-endian bytes, in the form the manifest holds.

    A view (a video's time range of a partition's block) is copied first: measured, that beats
    hashing its contiguous channels one by one, the copy being cheap and leaving the bytes in
    cache for the hash.
    """
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    if algorithm == XXH3:
        return f"{XXH3}:{xxhash.xxh3_128_hexdigest(little.data)}"
    if algorithm == "sha256":
        return hashlib.sha256(little.data).hexdigest()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {ALGORITHMS}")


def matches(array: np.ndarray, digest: str) -> bool:
    """Whether ``array`` has the checksum ``digest`` (of either algorithm)."""
    return checksum(array, algorithm_of(digest)) == digest
