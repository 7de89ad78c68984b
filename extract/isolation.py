"""Decoding in a child process: ``decode_video`` behind a wall-clock timeout.

decord can hang, abort or segfault on a bad file. ``IsolatedDecoder`` runs ``decode_video`` in
a persistent child process: the parent survives, records why (failure kind ``timeout`` or
``crashed``), restarts the child and goes on.

This module must not import torch: it is what the decoder child process loads.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

from astar.extract.decode import DecodeConfig, DecodedVideo, VideoDecodeError, _fail, decode_video

log = logging.getLogger(__name__)

# A fresh interpreter importing numpy and decord needs about a second; allow for a loaded machine.
STARTUP_TIMEOUT_S = 120.0

# The child's loop, as "module:function" called with the request and result pipe descriptors.
CHILD_MAIN = "astar.extract.isolation:_child_main"


class DecoderStartupError(RuntimeError):
    """The decoder child process could not start: the environment is broken, not a video."""


class IsolatedDecoder:
    """``decode_video`` in a persistent child process with a per-video wall-clock timeout.

    The child is a fresh interpreter (never a fork of this process, which may hold torch's
    threads). It is started with ``subprocess`` rather than multiprocessing's spawn context
    because spawn re-imports the parent's ``__main__`` in the child, which for the
    ``extract-features`` CLI would load torch there too; messages still use multiprocessing's
    pickled ``Connection`` framing over two pipes. A third pipe collects the child's stderr
    (ffmpeg's complaints about bad files) so the last lines can explain a crash.

    ``imap`` keeps ``prefetch`` videos queued beyond the one it hands out, and a thread drains
    the child's results as they come, so the child decodes ahead while the caller computes.
    A hung child is killed after ``config.timeout_s`` (kind ``timeout``), a dead one is noticed
    at once (kind ``crashed``); either way a new child takes over the videos still queued.

    ``child_main`` names the loop the child runs (``CHILD_MAIN``, which decodes with
    ``decode_video``). Tests name one that misbehaves on chosen files, as decord does on bad
    ones, to check that the parent copes.
    """

    def __init__(
        self,
        config: DecodeConfig,
        prefetch: int = 2,
        *,
        child_main: str = CHILD_MAIN,
    ) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        module, _, function = child_main.partition(":")
        if not all(name.isidentifier() for name in [*module.split("."), function]):
            raise ValueError(f"child_main must be 'module:function', got {child_main!r}")
        self.config = config
        self.prefetch = prefetch
        self.child_main = child_main
        self._child: _Child | None = None
        self._next_seq = 0
        self._in_imap = False
        self.restarts = 0  # children replaced after a hang or a crash

    def __enter__(self) -> IsolatedDecoder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child (politely, then by force)."""
        if self._child is not None:
            self._child.close()
            self._child = None

    def decode(self, path: str | Path) -> DecodedVideo:
        """Decode one video in the child; raises ``VideoDecodeError`` (also timeout/crashed)."""
        ((_, result),) = list(self.imap([path]))
        if isinstance(result, VideoDecodeError):
            raise result
        return result

    def imap(
        self, paths: Iterable[str | Path]
    ) -> Iterator[tuple[str | Path, DecodedVideo | VideoDecodeError]]:
        """``(path, result)`` in the order given; a failed video's result is its error."""
        if self._in_imap:
            raise RuntimeError("IsolatedDecoder runs one imap at a time")
        self._in_imap = True
        pending: collections.deque[tuple[int, str | Path]] = collections.deque()
        remaining = iter(paths)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) <= self.prefetch:
                    path = next(remaining, _NO_MORE)
                    if path is _NO_MORE:
                        exhausted = True
                    else:
                        pending.append((self._next_seq, path))
                        self._next_seq += 1
                        self._send(*pending[-1])
                if not pending:
                    return
                seq, path = pending[0]
                result = self._await(seq, path, pending)
                pending.popleft()
                yield path, result
        finally:
            self._in_imap = False
            if pending and self._child is not None:
                # Abandoned mid-way: the child would decode every queued video before it read
                # a request to stop, and its results would be stale. Kill it instead.
                self._child.kill()
                self.close()

    def _send(self, seq: int, path: str | Path) -> None:
        if self._child is None:
            self._child = _Child(self.config, self.child_main)
        self._child.send(seq, path)

    def _await(
        self, seq: int, path: str | Path, pending: collections.deque
    ) -> DecodedVideo | VideoDecodeError:
        """The result of the oldest queued request, or the error of a hang or a crash."""
        retried = False
        while True:
            child = self._child
            assert child is not None  # _send started it
            message = child.next_message(self._time_left(child, seq))
            if message is not None and message is not _Child.EOF:
                if message[0] == "done" and message[1] == seq:
                    child.forget(seq)
                    return message[2]
                continue  # a "start" (the collector thread noted its time) or a stale result
            if message is _Child.EOF and seq not in child.started and not retried:
                # It died between videos (killed from outside?): not this video's fault.
                log.warning("decoder process %s between videos; restarting", child.describe_exit())
                self._replace_child(list(pending))
                retried = True
                continue
            if message is None:
                problem = (
                    f"decoding took longer than {self.config.timeout_s:g} s; "
                    "the decoder process was killed"
                )
                child.kill()
            else:
                problem = (
                    f"the decoder process {child.describe_exit()} while decoding this file"
                    f"{child.last_output()}"
                )
            error = _fail(Path(path), "timeout" if message is None else "crashed", problem)
            log.warning("%s", error.reason)
            self._replace_child(list(pending)[1:])
            return error

    def _time_left(self, child: _Child, seq: int) -> float:
        """Seconds before the request ``seq`` counts as hung.

        The clock runs from when the child took the video up or, until it says so, from when
        the video became the oldest one waiting.
        """
        started = child.started.get(seq, child.clock_floor(seq))
        return max(started + self.config.timeout_s - time.monotonic(), 0.0)

    def _replace_child(self, resend: list[tuple[int, str | Path]]) -> None:
        """Stop the current child and hand the requests ``resend`` to a new one."""
        if self._child is not None:
            self._child.kill()
            self._child.close()
            self._child = None
        self.restarts += 1
        for seq, path in resend:
            self._send(seq, path)


_NO_MORE = object()


class _Child:
    """One decoder child process, the thread collecting its messages and its stderr tail."""

    EOF = ("eof",)

    def __init__(self, config: DecodeConfig, child_main: str) -> None:
        module, _, function = child_main.partition(":")
        request_read, request_write = os.pipe()
        result_read, result_write = os.pipe()
        log_read, log_write = os.pipe()
        command = [
            sys.executable,
            "-c",
            f"from {module} import {function}; {function}({request_read}, {result_write})",
        ]
        self.process = subprocess.Popen(
            command,
            pass_fds=(request_read, result_write),
            stdin=subprocess.DEVNULL,
            stdout=log_write,
            stderr=log_write,
        )
        # Close our copies of the child's ends, so that its death reads as end-of-file here.
        for fd in (request_read, result_write, log_write):
            os.close(fd)
        self._requests = Connection(request_write, readable=False)
        self._results = Connection(result_read, writable=False)
        self._messages: queue.Queue = queue.Queue()
        self._output: collections.deque[str] = collections.deque(maxlen=64)
        self.started: dict[int, float] = {}  # seq -> when the child began it (monotonic)
        self._sent: dict[int, float] = {}  # seq -> when it was queued
        self._last_done = time.monotonic()
        self._readers = [
            threading.Thread(target=self._collect, name="decode-results", daemon=True),
            threading.Thread(target=self._drain, args=(log_read,), name="decode-log", daemon=True),
        ]
        for thread in self._readers:
            thread.start()
        self._requests.send(config)
        ready = self.next_message(STARTUP_TIMEOUT_S)
        if ready is None or ready[0] != "ready":
            self.kill()
            why = "did not start in time" if ready is None else self.describe_exit()
            self.close()
            raise DecoderStartupError(f"decoder child process {why}{self.last_output()}")

    def _collect(self) -> None:
        """Move every message from the child into the queue, then EOF when the child is gone."""
        while True:
            try:
                message = self._results.recv()
            except (EOFError, OSError):
                self._messages.put(self.EOF)
                return
            now = time.monotonic()
            if message[0] == "start":
                self.started[message[1]] = now
            elif message[0] == "done":
                self._last_done = now
            self._messages.put(message)

    def _drain(self, fd: int) -> None:
        with open(fd, "rb") as stream:
            for line in stream:
                text = line.decode(errors="replace").rstrip()
                self._output.append(text)
                log.debug("decoder child: %s", text)

    def send(self, seq: int, path: str | Path) -> None:
        self._sent[seq] = time.monotonic()
        # A dead child cannot take it; its end-of-file will tell, and the request is resent.
        with contextlib.suppress(BrokenPipeError):
            self._requests.send((seq, str(path)))

    def forget(self, seq: int) -> None:
        self.started.pop(seq, None)
        self._sent.pop(seq, None)

    def clock_floor(self, seq: int) -> float:
        """When the clock of a request not yet started begins: queued, or the last one done."""
        return max(self._sent.get(seq, 0.0), self._last_done)

    def next_message(self, timeout_s: float):
        """The next message, ``EOF`` once the child is gone, or None after ``timeout_s``."""
        try:
            return self._messages.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """Ask the child to exit, kill it if it does not, and release the pipes."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):  # the child may already have closed its end
                self._requests.send(None)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._requests.close()
        for thread in self._readers:
            thread.join(timeout=5)
        self._results.close()

    def describe_exit(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def last_output(self) -> str:
        """The child's last complaints (ffmpeg's), and where faulthandler saw it die."""
        for thread in self._readers[1:]:
            thread.join(timeout=1)  # the stderr pipe closes when the child is gone
        lines = [line for line in self._output if line.strip()]
        fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python")), None)
        shown = lines[:fatal][-3:] if fatal is not None else lines[-3:]
        if fatal is not None:
            shown.append(lines[fatal])
            current = [i for i, line in enumerate(lines) if line.startswith("Current thread")]
            if current and current[0] + 1 < len(lines):
                shown.append(f"in {lines[current[0] + 1].strip()}")  # the innermost frame
        return f"; its last output: {' | '.join(shown)}" if shown else ""


def _child_main(
    request_fd: int,
    result_fd: int,
    decode: Callable[[Path, DecodeConfig], DecodedVideo] = decode_video,
) -> None:
    """The child's loop: setup, then ``(seq, path)`` requests until None or end-of-file.

    ``decode`` is what each request runs; tests wrap ``decode_video`` to misbehave.
    """
    faulthandler.enable()  # a segfault or abort leaves a Python stack in the parent's log
    requests = Connection(request_fd, writable=False)
    results = Connection(result_fd, readable=False)
    config = requests.recv()
    _exit_with_parent(os.getppid())
    results.send(("ready", os.getpid()))
    while True:
        try:
            message = requests.recv()
        except EOFError:
            return
        if message is None:
            return
        seq, path = message
        results.send(("start", seq))
        results.send(("done", seq, _decode_or_error(Path(path), config, decode)))


def _decode_or_error(
    path: Path, config: DecodeConfig, decode: Callable[[Path, DecodeConfig], DecodedVideo]
) -> DecodedVideo | VideoDecodeError:
    try:
        return decode(path, config)
    except VideoDecodeError as error:
        return error
    except Exception as error:  # a bug or MemoryError: one video's failure, kept as data
        traceback.print_exc()  # reaches the parent's debug log through the stderr pipe
        return _fail(path, "decode_error", f"unexpected {type(error).__name__}: {error}")


def _exit_with_parent(parent_pid: int) -> None:
    """Exit when the parent dies, even while a request is in progress."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
