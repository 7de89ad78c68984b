"""Crash-safe file primitives: atomic replacement, fsync, and the partition lock.

Every file that readers trust appears by ``os.replace`` (or ``os.rename`` for a directory) of a
fully written and fsynced temporary, so a kill at any instant leaves either the old state or the
new one, never a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from astar.store.errors import PartitionLocked, StoreError

TEMP_PREFIX = ".tmp-"  # temporaries start with this; anything named so is never final


def temp_name(path: Path) -> Path:
    """A unique temporary beside ``path`` (same directory, so the final rename is atomic)."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, children before parents."""
    for directory, _, names in os.walk(root, topdown=False):
        for name in names:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(directory))


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary, fsync it, then replace."""
    temporary = temp_name(path)
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        # Also on KeyboardInterrupt: a temporary must not outlive a failed write.
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


# --------------------------------------------------------------------------------------------
# Lock


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        # Field 22; the command name (field 2) may hold spaces, so count after its ')'.
        return stat.rsplit(")", 1)[1].split()[19]
    return None


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: enough to decide, on the same host, whether the holder is still alive."""

    host: str  # socket.gethostname() of the holder
    pid: int  # process id of the holder
    start: str | None  # the holder's start time (Linux /proc), None where unknown
    since: float  # time.time() when the lock was taken

    @classmethod
    def me(cls) -> LockOwner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _process_start(pid), time.time())

    def alive(self) -> bool | None:
        """True/False on this host; None on another host, where liveness cannot be checked."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        # The pid exists; it is the holder only if it started when the holder did.
        return self.start is None or _process_start(self.pid) in (None, self.start)

    def describe(self) -> str:
        held = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} since {held}"


def _link_exclusive(source: Path, target: Path) -> bool:
    """Create ``target`` as a hard link to ``source``; False if ``target`` exists (atomic)."""
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    return True


def read_owner(path: Path) -> LockOwner:
    try:
        return LockOwner(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise StoreError(f"{path}: unreadable lock file ({error}); delete it by hand") from error


class FileLock:
    """An exclusive lock on a name, as a file holding its owner; works on local disks and NFS.

    Taking it hard-links a fully written temporary to the lock name: ``link`` fails when the name
    exists, like ``O_CREAT | O_EXCL``, but the lock file can never be seen empty or half
    written. A lock left by a dead process of this host is broken; a live holder, or a holder on
    another host (whose liveness cannot be checked from here), raises :class:`PartitionLocked`.
    """

    def __init__(self, path: Path):
        self.path = path
        self.owner: LockOwner | None = None  # set while held

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock; :class:`PartitionLocked` if a live process holds it for more than
        ``wait`` seconds (0: refuse at once)."""
        owner = LockOwner.me()
        temporary = temp_name(self.path)
        atomic_write_text(temporary, json.dumps(asdict(owner)))
        started = time.monotonic()
        deadline = started + max(2.0, wait)
        try:
            while True:
                if _link_exclusive(temporary, self.path):
                    self.owner = owner
                    return
                try:
                    self._break_if_stale(temporary)
                except PartitionLocked:
                    if time.monotonic() - started >= wait:
                        raise
                    time.sleep(0.01)  # a live holder: wait for it to release
                if time.monotonic() > deadline:
                    raise PartitionLocked(f"{self.path}: lock contended, could not take it")
        finally:
            temporary.unlink(missing_ok=True)

    def _holder(self, path: Path | None = None) -> LockOwner | None:
        try:
            return read_owner(path or self.path)
        except FileNotFoundError:
            return None

    def _break_if_stale(self, mine: Path) -> None:
        """Remove the lock if its holder is dead, else raise :class:`PartitionLocked`.

        Several processes may find the same stale lock; removing it blindly could remove the
        fresh lock one of them has just taken. So breaking is itself guarded by a second lock
        (``<name>.break``, taken the same way): under it the lock is read again and removed only
        if it is still the dead holder's. A breaker dying inside this short section leaves a
        guard whose holder is dead, which the next breaker removes.
        """
        holder = self._holder()
        if holder is None:
            return  # released meanwhile: retry
        alive = holder.alive()
        if alive is None:
            raise PartitionLocked(
                f"{self.path} is held by {holder.describe()} (another host, liveness unknown); "
                "delete the lock file if that process is gone"
            )
        if alive:
            raise PartitionLocked(f"{self.path} is held by live {holder.describe()}")
        guard = self.path.with_name(self.path.name + ".break")
        if not _link_exclusive(mine, guard):
            breaker = self._holder(guard)
            if breaker is not None and breaker.alive() is False:
                guard.unlink(missing_ok=True)
            else:
                time.sleep(0.01)  # another process is breaking it right now
            return
        try:
            if self._holder() == holder:
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        if self.owner is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if read_owner(self.path) == self.owner:
                self.path.unlink()
        self.owner = None


# --------------------------------------------------------------------------------------------
# Running out of space


def _no_space_error(error: BaseException | None) -> OSError | None:
    """The "no space left" (or quota) error in ``error`` or its causes, else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def no_space_report(error: BaseException, where: Path, kept: str) -> str | None:
    """If ``error`` comes from a full disk: which file, what is free now, and ``kept`` (what
    the user still has and how to go on). None for any other error."""
    full = _no_space_error(error)
    if full is None:
        return None
    target = Path(full.filename) if full.filename else Path(where)
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = f"{shutil.disk_usage(existing).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    return f"no space left on the device while writing {target} ({free}). {kept}"


def unpickler_reason(error: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, without torch's advice.

    Torch wraps the unpickler's reason in paragraphs suggesting ``weights_only=False``, which is
    exactly what must not be done with a file that was refused; only the reason is kept.
    """
    text = " ".join(str(error).split())
    _, found, reason = text.partition("WeightsUnpickler error:")
    if found:  # the reason, up to where torch's allowlisting advice begins
        return reason.strip().split(". ")[0]
    paragraphs = [" ".join(p.split()) for p in str(error).split("\n\n") if p.strip()]
    kept = [
        p
        for p in paragraphs
        if "weights_only" not in p and not p.startswith("Check the documentation")
    ]
    return " ".join(kept)[:300] or type(error).__name__
