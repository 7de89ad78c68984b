"""Container checks before decoding: is the file cut short, and what size are its frames.

``container_shortfall`` compares the byte count a container declares (MP4/MOV top-level boxes,
the Matroska/WebM segment size, AVI RIFF chunks) with the file's size, to catch files cut short
e.g. by an interrupted download. ``_source_size`` reads the coded frame size from the header.
Nothing here decodes a frame.
"""

from __future__ import annotations

from pathlib import Path


def container_shortfall(path: str | Path) -> tuple[int, int] | None:
    """``(declared, actual)`` bytes when the container says the file is longer than it is.

    Knows MP4/MOV (top-level box sizes), Matroska/WebM (the segment size) and AVI (RIFF chunk
    sizes); ``None`` for a complete file or a format it does not know.
    """
    path = Path(path)
    actual = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(16)
        if head[4:8] in _MP4_FIRST_BOXES:
            declared = _mp4_extent(handle, actual)
        elif head[:4] == _EBML_MAGIC:
            handle.seek(0)
            declared = _matroska_extent(handle.read(4096))
        elif head[:4] == b"RIFF":
            declared = _riff_extent(handle, actual)
        else:
            declared = None
    return (declared, actual) if declared is not None and declared > actual else None


_MP4_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"})
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_MATROSKA_SEGMENT = 0x18538067


def _mp4_extent(handle, actual: int) -> int | None:
    """End of the last top-level box, or of the first that runs past ``actual``."""
    position = 0
    while position + 8 <= actual:
        handle.seek(position)
        header = handle.read(16)
        size = int.from_bytes(header[:4], "big")
        if size == 1:  # a 64-bit size follows the type
            size = int.from_bytes(header[8:16], "big")
        elif size == 0:  # the box runs to the end of the file, whatever that is
            return None
        if size < 8:  # malformed; let decord judge it
            return None
        position += size
        if position > actual:
            return position
    return position


def _riff_extent(handle, actual: int) -> int | None:
    """End of the last RIFF chunk (AVI files over 1 GiB chain RIFF 'AVIX' chunks)."""
    position = 0
    while position + 8 <= actual:
        handle.seek(position)
        header = handle.read(8)
        if header[:4] != b"RIFF":
            break
        position += 8 + int.from_bytes(header[4:8], "little")
        if position > actual:
            return position
    return position


def _matroska_extent(head: bytes) -> int | None:
    """End of the Segment element, or None when its size is unknown (live streams)."""
    try:
        _, position = _ebml_vint(head, 0, keep_marker=True)  # EBML header id
        header_size, position = _ebml_vint(head, position, keep_marker=False)
        position += header_size
        segment_id, position = _ebml_vint(head, position, keep_marker=True)
        segment_size, position = _ebml_vint(head, position, keep_marker=False)
    except IndexError:
        return None
    if segment_id != _MATROSKA_SEGMENT or segment_size is None:
        return None
    return position + segment_size


def _ebml_vint(data: bytes, position: int, keep_marker: bool) -> tuple[int | None, int]:
    """An EBML variable-length integer at ``position``: (value, position after it).

    The count of leading zero bits of the first byte gives the length; sizes whose value bits
    are all ones mean "unknown" and come back as None.
    """
    length = 9 - data[position].bit_length()  # leading zero bits + 1
    if not 1 <= length <= 8 or len(data) < position + length:
        raise IndexError("not an EBML integer, or it runs past the data read")
    raw = int.from_bytes(data[position : position + length], "big")
    if keep_marker:
        return raw, position + length
    value = raw & ((1 << (7 * length)) - 1)
    return (None if value == (1 << (7 * length)) - 1 else value), position + length


def _source_size(path: Path) -> tuple[int, int]:
    """Coded width and height from the container header (PyAV reads headers, decodes nothing).

    decord has no getter for the source size once it resizes at decode; (0, 0) if PyAV cannot
    tell, since the size is informational only.
    """
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            return int(stream.codec_context.width), int(stream.codec_context.height)
    except (av.FFmpegError, IndexError, OSError):
        return 0, 0
