"""Reading samples out of tars: by index (random access, what training does) or in stored order
(evaluation, `umt data inspect`). Never raises for bad data: a sample that cannot be read is
None with its reason counted.

Reasons: `missing_shard` (the file is gone), `bad_index` (the index does not match the tar),
`truncated_tar` (the file ends inside the sample), `missing_image`, `missing_json`, `bad_json`,
`missing_caption`.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from data_pipeline.loader import storage
from data_pipeline.loader.dataset import Shard
from data_pipeline.loader.tar_index import (
    TarIndex,
    TarIndexError,
    load_index,
    member_key,
    split_members,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class RawSample:
    key: str
    image_key: str
    image: bytes  # still encoded
    text: str  # the sample's own caption (.txt, else json "caption")
    captions: tuple[str, ...]  # json "captions": all captions of the image
    meta: dict = field(default_factory=dict, compare=False)  # the parsed .json member


def assemble_sample(key: str, members: dict[str, bytes], errors: Counter) -> RawSample | None:
    """Members of one key -> RawSample, or None with the reason counted."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        errors["missing_image"] += 1
        return None
    if "json" not in members:
        errors["missing_json"] += 1
        return None
    try:
        meta = json.loads(members["json"])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        errors["bad_json"] += 1
        return None
    captions = meta.get("captions") or []
    captions = (
        tuple(c for c in captions if isinstance(c, str)) if isinstance(captions, list) else ()
    )
    text = members["txt"].decode("utf-8", "replace") if "txt" in members else None
    text = text or meta.get("caption") or (captions[0] if captions else None)
    if not isinstance(text, str) or not text:
        errors["missing_caption"] += 1
        return None
    image_key = str(meta.get("image_key", key))
    return RawSample(key, image_key, members[image_ext], text, captions or (text,), meta=meta)


class ShardReader:
    """Random access to samples of many shards, by (shard, index within it).

    Keeps the indexes and open files of the most recently used shards (a worker reads the few
    shards of the current window over and over).
    """

    def __init__(self, shards: tuple[Shard, ...], keep_open: int = 32):
        self.shards = shards
        self.keep_open = keep_open
        self._open: OrderedDict[int, tuple[TarIndex, storage.RangeReader]] = OrderedDict()
        self._broken: dict[int, str] = {}  # shard -> reason it cannot be read at all

    def _get(self, shard: int, errors: Counter) -> tuple[TarIndex, storage.RangeReader] | None:
        if shard in self._broken:
            errors[self._broken[shard]] += 1
            return None
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.shards[shard].path
        try:
            entry = (load_index(path), storage.RangeReader(path))
        except FileNotFoundError:
            self._broken[shard] = "missing_shard"
        except TarIndexError:
            self._broken[shard] = "bad_index"
        except OSError:
            self._broken[shard] = "missing_shard"
        if shard in self._broken:
            errors[self._broken[shard]] += 1
            return None
        self._open[shard] = entry
        if len(self._open) > self.keep_open:
            _, (_, reader) = self._open.popitem(last=False)
            reader.close()
        return entry

    def shard_name(self, shard: int) -> str:
        return storage.basename(self.shards[shard].path)

    def read(self, shard: int, index: int, errors: Counter) -> RawSample | None:
        """Sample `index` of shard `shard`, or None with the reason counted."""
        entry = self._get(shard, errors)
        if entry is None:
            return None
        tar_index, reader = entry
        if index >= len(tar_index):  # the manifest promised more samples than the tar holds
            errors["truncated_tar"] += 1
            return None
        key = tar_index.keys[index]
        try:
            members = split_members(reader.read(tar_index.offsets[index], tar_index.lengths[index]))
        except EOFError:
            errors["truncated_tar"] += 1
            return None
        except (tarfile.TarError, OSError, zlib.error):
            errors["bad_index"] += 1
            return None
        return assemble_sample(key, members, errors)

    def key(self, shard: int, index: int) -> str | None:
        """The sample key from the index alone (None if the shard cannot be read)."""
        entry = self._get(shard, Counter())
        if entry is None or index >= len(entry[0]):
            return None
        return entry[0].keys[index]

    def close(self) -> None:
        for _, reader in self._open.values():
            reader.close()
        self._open.clear()


def read_tar_samples(shard: Shard, errors: Counter) -> Iterator[RawSample]:
    """Stream one tar's samples in stored order; a truncated or unreadable tar ends its stream,
    counted, never raises."""
    seen = 0
    try:
        with (
            storage.open_stream(shard.path) as handle,
            tarfile.open(fileobj=handle, mode="r|*") as tar,
        ):
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                name_key = member_key(info.name)
                if name_key != key:
                    if members:
                        seen += 1
                        if (sample := assemble_sample(key, members, errors)) is not None:
                            yield sample
                    key, members = name_key, {}
                members[info.name.rsplit("/", 1)[-1].partition(".")[2].lower()] = tar.extractfile(
                    info
                ).read()
            if members:
                seen += 1
                if (sample := assemble_sample(key, members, errors)) is not None:
                    yield sample
    except FileNotFoundError:
        errors["missing_shard"] += 1
        return
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        errors["truncated_tar"] += 1  # the half-read sample is lost with it
        return
    if seen < shard.count:  # cut exactly at a header boundary reads as a clean end
        errors["truncated_tar"] += 1
