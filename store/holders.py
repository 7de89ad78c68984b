"""Who is using a store or a run directory right now: the processes holding its lock files.

Every process that writes a store registers itself for its whole run with a lock file
``locks/run-<host>-<pid>.lock`` (besides the partition locks it takes one at a time), so that a
tool about to delete the store, such as ``extract-features --resume-or-restart``, can see that a
live process is still working there and refuse, even between two partitions.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from astar.store.errors import StoreError
from astar.store.files import TEMP_PREFIX, FileLock, read_owner
from astar.store.location import is_remote

RUN_LOCK_PREFIX = "run-"  # under locks/: one per process writing the store


def live_holders(locks: Path) -> list[str]:
    """Descriptions of the live (or, on another host, possibly live) holders of ``locks/*``."""
    holders = []
    for entry in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        if entry.name.startswith(TEMP_PREFIX):
            continue
        try:
            owner = read_owner(entry)
        except (OSError, StoreError):  # vanished meanwhile, or unreadable: not a live holder
            continue
        alive = owner.alive()
        if alive is None:
            holders.append(f"{owner.describe()} ({entry.name}; another host, maybe alive)")
        elif alive:
            holders.append(f"{owner.describe()} ({entry.name})")
    return holders


@contextlib.contextmanager
def registered_writer(store_path: Path) -> Iterator[None]:
    """Hold ``locks/run-<host>-<pid>.lock`` of the store at ``store_path`` while inside.

    Locks of dead writers of this host are removed on the way in (a killed run's leftovers).
    """
    locks = store_path / "locks"
    if not is_remote(locks):  # on object storage a folder is only a prefix
        locks.mkdir(parents=True, exist_ok=True)
    for entry in locks.glob(f"{RUN_LOCK_PREFIX}*.lock"):
        with contextlib.suppress(OSError, StoreError):
            if read_owner(entry).alive() is False:
                entry.unlink()
    lock = FileLock(locks / f"{RUN_LOCK_PREFIX}{socket.gethostname()}-{os.getpid()}.lock")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
