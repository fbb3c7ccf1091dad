"""The storage seam: every read of a manifest, an index or a shard goes through here.

Locations are strings: local paths today (`~` expanded). Object storage (`s3://`, `http(s)://`)
plugs in here, behind the same functions, so that nothing else in the loader opens a file.
"""

from __future__ import annotations

import os


def normalize(location: str) -> str:
    return os.path.expanduser(location)


def join(folder: str, name: str) -> str:
    return os.path.join(folder, name)


def parent(location: str) -> str:
    return os.path.dirname(location)


def basename(location: str) -> str:
    return os.path.basename(location.rstrip("/"))


def is_dir(location: str) -> bool:
    return os.path.isdir(location)


def is_file(location: str) -> bool:
    return os.path.isfile(location)


def size(location: str) -> int:
    return os.path.getsize(location)


def read_bytes(location: str) -> bytes:
    with open(location, "rb") as handle:
        return handle.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


class RangeReader:
    """Reads byte ranges of one file; keeps it open (a worker reads many samples of a shard)."""

    def __init__(self, location: str):
        self.location = location
        self._fd = os.open(location, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:  # the file ends early: a truncated copy
            raise EOFError(f"{self.location}: {length} bytes wanted at {offset}, {len(data)} read")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def open_stream(location: str):
    """A binary file object for reading `location` from the start (sequential tar reading)."""
    return open(location, "rb")
