"""Where a store lives: a local directory, or any fsspec URL (``s3://bucket/store``, ...).

A local store is a :class:`pathlib.Path` and keeps the POSIX protocol of the rest of the
package: temporaries renamed into place, fsync, hard-link locks. Anything else is a
:class:`upath.UPath` over fsspec, whose objects are written whole by one request (a PUT is
atomic: an object is seen complete or not at all) but where rename is a copy and a directory
is only a key prefix. The few operations that differ are here; see
:mod:`astar.store.writer` for how a partition is committed on each kind of storage.

Credentials and endpoints never come through astar: fsspec's own configuration supplies them
(``FSSPEC_S3_ENDPOINT_URL`` and other ``FSSPEC_<PROTOCOL>_<OPTION>`` variables, or the files
under ``~/.config/fsspec``), as do the usual variables of the backend (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``AWS_PROFILE`` for s3fs).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from upath import UPath
    from zarr.abc.store import Store

StorePath = Union[Path, "UPath"]  # a local directory, or a location on a fsspec filesystem
LOCAL_PROTOCOLS = ("file", "local")


def store_path(spec: str | os.PathLike[str] | UPath) -> StorePath:
    """The location named by ``spec``: a :class:`Path` for a local path or ``file://`` URL,
    else a :class:`UPath` (the fsspec backend, e.g. s3fs, must be installed)."""
    if isinstance(spec, Path) or is_remote(spec):
        return spec  # type: ignore[return-value]
    text = os.fspath(spec)  # type: ignore[arg-type]
    protocol, found, rest = text.partition("://")
    if not found:
        return Path(text)
    if protocol in LOCAL_PROTOCOLS:
        return Path(rest)
    from upath import UPath

    try:
        return UPath(text)
    except (ImportError, ValueError) as error:
        raise ValueError(
            f"{text}: no filesystem for {protocol}:// ({error}); install its fsspec backend, "
            "e.g. pip install 'astar-captioning[s3]' for s3://"
        ) from error


def store_argument(exists: bool = False) -> Any:
    """A click parameter type for a store: a local directory (must exist with ``exists``) or
    any fsspec URL, converted by :func:`store_path`. Credentials are never options: fsspec's
    configuration and the backend's environment supply them."""
    import click

    class StoreLocation(click.ParamType):
        name = "STORE"

        def convert(self, value: Any, param: Any, ctx: Any) -> StorePath:
            try:
                location = store_path(value)
            except ValueError as error:
                self.fail(str(error), param, ctx)
            if exists and not is_remote(location):
                if not location.exists():
                    self.fail(f"directory {str(location)!r} does not exist", param, ctx)
                if not location.is_dir():
                    self.fail(f"{str(location)!r} is a file, not a store directory", param, ctx)
            return location

    return StoreLocation()


def local_only(ctx: Any, param: Any, value: Any) -> Any:
    """A click callback refusing a URL where only a local (or mounted) path will do: click's
    Path would quietly turn ``s3://bucket/run`` into the relative directory ``s3:/bucket/run``."""
    import click

    text = "" if value is None else os.fspath(value)
    if "://" in text or text.split("/", 1)[0].endswith(":"):
        raise click.BadParameter(
            f"{text!r}: a URL; this must be a local or mounted path (only the feature store "
            "may be at a URL)",
            ctx,
            param,
        )
    return value


def is_remote(path: object) -> bool:
    """True for a location on a fsspec filesystem (UPath), False for a local path."""
    return not isinstance(path, (Path, str, os.PathLike)) and hasattr(path, "fs")


def write_once(path: UPath, data: bytes) -> bool:
    """Create the object ``path`` holding ``data`` unless it exists; False if it did.

    One conditional request (``If-None-Match: *`` on S3, exclusive create elsewhere): of any
    number of writers racing for a name, exactly one succeeds, and the object is never seen
    partly written.
    """
    try:
        path.fs.pipe_file(path.path, data, mode="create")
    except FileExistsError:
        return False
    return True


def put(path: UPath, data: bytes) -> None:
    """Write the object ``path`` whole, replacing it: one request, atomic for readers."""
    path.fs.pipe_file(path.path, data)


class Superseded(Exception):
    """A conditional replace refused: the object is no longer the version it was read as."""


def version_of(path: UPath) -> str | None:
    """The current version tag of object ``path`` (S3's ETag, fetched afresh), for
    :func:`replace_if_unchanged`; None on a backend where this code makes no conditional
    replace (there it is a plain :func:`put`)."""
    if "s3" not in _protocols(path):
        return None
    path.fs.invalidate_cache(path.path)  # s3fs answers info from its listing cache
    return path.fs.info(path.path)["ETag"]


def replace_if_unchanged(path: UPath, data: bytes, version: str | None) -> None:
    """Replace object ``path`` with ``data`` only while it is still ``version`` (S3
    ``If-Match``: one request, decided by the server), else :class:`Superseded`. ``None``:
    replace whatever is there."""
    if version is None:
        put(path, data)
        return
    try:
        path.fs.pipe_file(path.path, data, IfMatch=version)
    except OSError as error:  # s3fs's translation; the cause holds the S3 error code
        code = getattr(error.__cause__, "response", {}).get("Error", {}).get("Code")
        if code == "PreconditionFailed":
            raise Superseded(f"{path}: replaced by another writer since it was read") from error
        raise


def _protocols(path: UPath) -> tuple[str, ...]:
    protocol = path.fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def remove_tree(path: StorePath) -> None:
    """Delete ``path`` and everything under it; nothing if it is absent."""
    if is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            path.fs.rm(path.path, recursive=True)
        return
    import shutil

    if Path(path).exists():
        shutil.rmtree(path)


def forget_listings(path: StorePath) -> None:
    """Drop the filesystem's cached listings, so that objects written by other processes since
    are seen (s3fs answers ``exists`` from its listing cache)."""
    if is_remote(path):
        path.fs.invalidate_cache()


def zarr_store(path: StorePath, read_only: bool) -> Store:
    """A zarr store rooted at ``path``: LocalStore on disk, FsspecStore elsewhere."""
    from zarr.storage import FsspecStore, LocalStore

    if not is_remote(path):
        return LocalStore(path, read_only=read_only)
    options: dict[str, Any] = dict(path.storage_options)
    return FsspecStore.from_url(str(path), storage_options=options or None, read_only=read_only)


__all__ = [
    "StorePath",
    "forget_listings",
    "is_remote",
    "local_only",
    "put",
    "remove_tree",
    "store_argument",
    "store_path",
    "write_once",
    "zarr_store",
]
