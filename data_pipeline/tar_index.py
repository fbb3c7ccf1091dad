"""Per-shard tar indexes: where each sample's members lie, for random access to any sample.

`data-000000.tar` has its index beside it in `data-000000.index.json`:

    {"format_version": 1, "shard": "data-000000.tar", "bytes": <tar size>,
     "samples": [[key, offset, length], ...]}

in stored order, where [offset, offset + length) are the bytes of the sample's members (their
headers, data and padding; GNU/pax extension headers included). `umt shard` writes one with
each shard; `umt data index` builds them for shards made by other tools (img2dataset,
open_clip-style tars) and checks existing ones against their tars. An index is plain JSON: reading
one runs no code.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass

from data_pipeline import storage

log = logging.getLogger("umt.data")
INDEX_FORMAT_VERSION = 1
INDEX_SUFFIX = ".index.json"


class TarIndexError(ValueError):
    """An index that does not describe its tar (stale, damaged, or of another format)."""


@dataclass(frozen=True)
class TarIndex:
    shard: str  # the tar's file name
    bytes: int  # the tar's size when indexed
    keys: tuple[str, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> dict:
        return {
            "format_version": INDEX_FORMAT_VERSION,
            "shard": self.shard,
            "bytes": self.bytes,
            "samples": [list(s) for s in zip(self.keys, self.offsets, self.lengths)],
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> TarIndex:
        try:
            if data.get("format_version") != INDEX_FORMAT_VERSION:
                raise TarIndexError(
                    f"{where}: index format_version {data.get('format_version')!r} is not "
                    f"{INDEX_FORMAT_VERSION}; rebuild it with `umt data index`"
                )
            samples = data["samples"]
            keys = tuple(str(s[0]) for s in samples)
            offsets = tuple(int(s[1]) for s in samples)
            lengths = tuple(int(s[2]) for s in samples)
            return cls(str(data["shard"]), int(data["bytes"]), keys, offsets, lengths)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            if isinstance(exc, TarIndexError):
                raise
            raise TarIndexError(f"{where} is not a tar index: {exc!r}") from None


def index_location(shard_location: str) -> str:
    """`.../data-000000.tar` -> `.../data-000000.index.json`."""
    stem = shard_location[:-4] if shard_location.endswith(".tar") else shard_location
    return stem + INDEX_SUFFIX


def member_key(name: str) -> str:
    """WebDataset convention: `dir/abc.0001.jpg` -> key `dir/abc` (the part before the first dot
    of the file name)."""
    folder, base = os.path.split(name)
    stem = base.partition(".")[0]
    return os.path.join(folder, stem) if folder else stem


def build_index(fileobj, shard_name: str, total_bytes: int, where: str | None = None) -> TarIndex:
    """Index a tar read from `fileobj` (seekable; only headers are read). Members of one sample
    are consecutive (the WebDataset convention); a key that comes back later is an error.
    `where` names the tar in messages (default: `shard_name`)."""
    where = where or shard_name
    keys: list[str] = []
    offsets: list[int] = []
    ends: list[int] = []
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key = member_key(info.name)
                end = info.offset_data + -(-info.size // 512) * 512
                if keys and keys[-1] == key:
                    ends[-1] = end
                    continue
                if key in seen:
                    raise TarIndexError(
                        f"{where}: members of sample {key!r} are not consecutive; "
                        "rewrite the tar with each sample's files together"
                    )
                seen.add(key)
                keys.append(key)
                offsets.append(info.offset)
                ends.append(end)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if not keys:
            raise TarIndexError(f"{where} is not a readable tar: {exc}") from None
        # Cut short (a crashed copy): keep what precedes the cut; a sample whose bytes run past
        # the end fails when read, counted as truncated_tar.
        log.warning("%s ends early (%s): indexed its first %d samples", where, exc, len(keys))
    lengths = [e - o for o, e in zip(offsets, ends)]
    return TarIndex(shard_name, total_bytes, tuple(keys), tuple(offsets), tuple(lengths))


def index_of_file(shard_location: str, local_copy: str | None = None) -> TarIndex:
    """Build the index of a tar by reading its headers (of `local_copy` for a remote shard)."""
    path = local_copy or shard_location
    if storage.is_remote(path):
        raise TarIndexError(
            f"{shard_location} has no index file, and indexing needs a local copy; write indexes "
            "with `umt data index` where the shards are made, or read through the shard cache"
        )
    with open(path, "rb") as handle:
        return build_index(
            handle, storage.basename(shard_location), os.path.getsize(path), where=shard_location
        )


def read_index(
    shard_location: str,
    local_copy: str | None = None,
    size: int | None = None,
    attempts: int | None = None,
) -> TarIndex | None:
    """The index beside a shard (local or remote), checked against the tar's size (`size` when
    given, else that of `local_copy`, else asked of storage); None if there is none. A remote
    one (and the tar's size, where asked) is requested up to `attempts` times (default: storage's
    retries)."""
    where = index_location(shard_location)
    text = storage.read_text_if_exists(where, attempts)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TarIndexError(f"{where} is not valid JSON: {exc}") from None
    index = TarIndex.from_json(data, where)
    if size is not None:
        actual = size
    else:
        actual = (
            os.path.getsize(local_copy) if local_copy else storage.size(shard_location, attempts)
        )
    if index.bytes != actual:
        raise TarIndexError(
            f"{where} was made for a tar of {index.bytes} bytes, {shard_location} has {actual}: "
            "the shard changed; rebuild the index with `umt data index`"
        )
    return index


def load_index(shard_location: str, local_copy: str | None = None) -> TarIndex:
    """The shard's index file, else one built now from the tar's headers (also when the index
    file no longer matches the tar, with a warning: a shard copied again, or cut short)."""
    try:
        index = read_index(shard_location, local_copy)
    except TarIndexError as exc:
        log.warning("%s; reading the tar's own headers instead", exc)
        index = None
    return index or index_of_file(shard_location, local_copy)


def write_index(index: TarIndex, location: str) -> None:
    write_json_whole(index.to_json(), location)


def write_json_whole(data, location: str) -> None:
    """Write a JSON file whole (local or remote): a temporary name then a rename, or one object
    PUT, so a reader never sees half of it."""
    remote = storage.is_remote(location)
    tmp = f"{location}.{os.getpid()}.tmp" if not remote else None
    if remote:
        import tempfile

        handle, tmp = tempfile.mkstemp(suffix=".json")
        os.close(handle)
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        if remote:
            storage.put_file(tmp, location)
        else:
            os.replace(tmp, location)
    finally:  # after a rename there is nothing left; after a failure no partial file stays
        if os.path.exists(tmp):
            os.remove(tmp)


def check_index(shard_location: str, local_copy: str | None = None) -> list[str]:
    """Differences between the index beside a shard and the shard itself (read from
    `local_copy` for a remote one); empty: the index is right."""
    try:
        stored = read_index(shard_location, local_copy)
    except TarIndexError as exc:
        return [str(exc)]
    if stored is None:
        return [f"{index_location(shard_location)} does not exist"]
    actual = index_of_file(shard_location, local_copy)
    problems = []
    if len(stored) != len(actual):
        problems.append(f"{len(stored)} samples indexed, the tar holds {len(actual)}")
    for i, (a, b) in enumerate(zip(zip(stored.keys, stored.offsets, stored.lengths),
                                   zip(actual.keys, actual.offsets, actual.lengths))):  # fmt: skip
        if a != b:
            problems.append(f"sample {i}: indexed {list(a)}, the tar has {list(b)}")
            break
    return problems


def split_members(data: bytes) -> dict[str, bytes]:
    """The members of one sample's byte range: {extension (lower case): data}.

    The headers are parsed here directly (ustar, with pax `x`/`g` and GNU `L` extension headers
    for long names), a tenth of the cost of a TarFile per sample; anything else (sparse files,
    base-256 sizes) goes through tarfile."""
    members: dict[str, bytes] = {}
    offset, end = 0, len(data)
    long_name: str | None = None
    while offset + 512 <= end:
        header = data[offset : offset + 512]
        if not header.strip(b"\0"):
            break  # end-of-archive blocks
        if header[257:262] != b"ustar" or header[124] & 0x80:
            return _split_with_tarfile(data)
        kind = header[156:157]
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        start = offset + 512
        if start + size > end:
            raise EOFError("a member runs past the sample's bytes")
        body = data[start : start + size]
        offset = start + -(-size // 512) * 512
        if kind == b"x":  # pax: the next member's attributes
            records = _pax_records(body)
            if "size" in records:
                return _split_with_tarfile(data)
            long_name = records.get("path", long_name)
        elif kind == b"L":  # GNU: the next member's name
            long_name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in (b"0", b"\0"):
            name = long_name or header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            members[os.path.basename(name).partition(".")[2].lower()] = body
            long_name = None
        elif kind != b"g":  # directories, links: not sample members
            long_name = None
    return members


def _pax_records(body: bytes) -> dict[str, str]:
    """`LEN key=value\n` records of a pax extended header."""
    records, i = {}, 0
    while i < len(body):
        space = body.index(b" ", i)
        length = int(body[i:space])
        key, _, value = body[space + 1 : i + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        i += length
    return records


def _split_with_tarfile(data: bytes) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                name = os.path.basename(info.name)
                members[name.partition(".")[2].lower()] = tar.extractfile(info).read()
    return members
