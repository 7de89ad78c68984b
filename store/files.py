"""Crash-safe file primitives: atomic replacement, fsync, and the partition lock.

Every file that readers trust appears by ``os.replace`` (or ``os.rename`` for a directory) of a
fully written and fsynced temporary, so a kill at any instant leaves either the old state or the
new one, never a half-written file under a final name. On object storage (a store at an fsspec
URL, see :mod:`astar.store.location`) the same guarantees come from whole-object writes: a PUT
is seen complete or not at all, and a lock is an object created only if absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from astar.store.errors import PartitionLocked, StoreError
from astar.store.location import (
    Superseded,
    is_remote,
    put,
    replace_if_unchanged,
    version_of,
    write_once,
)

log = logging.getLogger(__name__)

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
    """Write ``path`` through ``write(handle)`` into a temporary, fsync it, then replace.

    On object storage the bytes are gathered in memory and written as one object.
    """
    if is_remote(path):
        buffer = io.BytesIO()
        write(buffer)
        put(path, buffer.getvalue())
        return
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


# A lock on object storage is renewed every LEASE_S / 5 seconds by its holder; one from another
# host not renewed for LEASE_S is a dead holder's (the hosts' clocks must agree to well within
# it, as NTP keeps them). On a local disk the holder's pid tells, and locks are not renewed.
LEASE_S = 300.0


def _process_state(pid: int) -> str | None:
    """State letter of ``pid`` (Linux /proc: R, S, D, Z...), None where unknown."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return None


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: enough to decide, on the same host, whether the holder is still alive."""

    host: str  # socket.gethostname() of the holder
    pid: int  # process id of the holder
    start: str | None  # the holder's start time (Linux /proc), None where unknown
    since: float  # time.time() when the lock was taken
    renewed: float | None = None  # time.time() of the last renewal (locks on object storage)

    @classmethod
    def me(cls, renewed: bool = False) -> LockOwner:
        pid, now = os.getpid(), time.time()
        return cls(socket.gethostname(), pid, _process_start(pid), now, now if renewed else None)

    def alive(self) -> bool | None:
        """True/False on this host, or on another host for a renewed lock (renewed within
        LEASE_S); None otherwise, where liveness cannot be checked."""
        if self.host != socket.gethostname():
            if self.renewed is None:
                return None
            return time.time() - self.renewed < LEASE_S
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        if _process_state(self.pid) == "Z":  # exited, not yet reaped by its parent: dead
            return False
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
    """An exclusive lock on a name, as a file holding its owner; works on local disks, NFS and
    object storage.

    On disk, taking it hard-links a fully written temporary to the lock name: ``link`` fails
    when the name exists, like ``O_CREAT | O_EXCL``, but the lock file can never be seen empty
    or half written. On object storage the lock is an object created only if absent (see
    :func:`~astar.store.location.write_once`), renewed by a thread of its holder every
    ``LEASE_S / 5`` seconds. A lock left by a dead process of this host, or on object storage
    one not renewed for ``LEASE_S``, is broken; a live holder, or a holder on another host whose
    liveness cannot be checked from here, raises :class:`PartitionLocked`.
    """

    def __init__(self, path: Path):
        self.path = path
        self.owner: LockOwner | None = None  # set while held
        self._remote = is_remote(path)
        self._renewing: threading.Event | None = None  # set to stop the renewal thread

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock; :class:`PartitionLocked` if a live process holds it for more than
        ``wait`` seconds (0: refuse at once)."""
        owner = LockOwner.me(renewed=self._remote)
        text = json.dumps(asdict(owner))
        temporary = None if self._remote else temp_name(self.path)
        create: Callable[[Path], bool]  # target -> whether this process created it
        if temporary is None:
            create = functools.partial(write_once, data=text.encode())
        else:
            atomic_write_text(temporary, text)
            create = functools.partial(_link_exclusive, temporary)
        started = time.monotonic()
        deadline = started + max(2.0, wait)
        try:
            while True:
                if create(self.path):
                    self.owner = owner
                    if self._remote:
                        self._start_renewing()
                    return
                try:
                    self._break_if_stale(create)
                except PartitionLocked:
                    if time.monotonic() - started >= wait:
                        raise
                    time.sleep(0.01)  # a live holder: wait for it to release
                if time.monotonic() > deadline:
                    raise PartitionLocked(f"{self.path}: lock contended, could not take it")
        finally:
            if temporary is not None:
                temporary.unlink(missing_ok=True)

    def _holder(self, path: Path | None = None) -> LockOwner | None:
        try:
            return read_owner(path or self.path)
        except FileNotFoundError:
            return None

    def _break_if_stale(self, create: Callable[[Path], bool]) -> None:
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
        if not create(guard):
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

    def _start_renewing(self) -> None:
        """Rewrite the lock with a fresh ``renewed`` time every LEASE_S / 5 until released."""
        stop = self._renewing = threading.Event()

        def renew() -> None:
            while not stop.wait(LEASE_S / 5) and self.renew_once():
                pass

        threading.Thread(target=renew, name="astar-lock-renewal", daemon=True).start()

    def renew_once(self) -> bool:
        """One renewal of a held lock on object storage; False once it is lost (or released).

        The lock is rewritten only if it is still this holder's: its version is taken first,
        then its content compared, then the new content written on condition that the version
        is unchanged (S3 ``If-Match``), so that a holder stalled past its lease, whose lock
        another writer broke and took between the read and the write, cannot overwrite the new
        holder's lock. Elsewhere the write follows the comparison unconditionally.
        """
        current = self.owner
        if current is None:
            return False
        fresh = dataclasses.replace(current, renewed=time.time())
        try:
            version = version_of(self.path)
            if read_owner(self.path) != current:  # broken and taken by another
                log.warning("%s: lock lost to another writer", self.path)
                return False
            replace_if_unchanged(self.path, json.dumps(asdict(fresh)).encode(), version)
            self.owner = fresh
        except Superseded:
            log.warning("%s: lock lost to another writer (taken while being renewed)", self.path)
            return False
        except FileNotFoundError:
            log.warning("%s: lock lost (removed by another writer)", self.path)
            return False
        except (OSError, StoreError) as error:  # a blip: try again next period
            log.warning("%s: could not renew the lock (%s)", self.path, error)
        return True

    def release(self) -> None:
        if self._renewing is not None:
            self._renewing.set()
            self._renewing = None
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
