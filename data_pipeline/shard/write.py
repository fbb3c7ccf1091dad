"""Writing one planned shard: fetch and prepare its rows, tar members, index, done-record."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline import faults
from data_pipeline.shard import output as shard_output
from data_pipeline.shard.download import fetch_in_order
from data_pipeline.shard.images import StoredImage, prepare_image
from data_pipeline.shard.manifest import (
    ShardRecord,
    done_path,
    file_sha256,
    record_to_json,
    write_json_atomic,
)
from data_pipeline.shard.options import SampleError, ShardOptions
from data_pipeline.shard.plan import KeyLayout, ShardTask, WorkItem, clean_captions
from data_pipeline.shard.sources import Row
from data_pipeline.tar_index import TarIndex, index_location, write_index

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z, fixed so that shards are byte-reproducible


FAILPOINT_ENV = faults.SHARD_FAILPOINT  # test hook: "{shard}:{samples}" or "{shard}:renamed"


_PROGRESS_EVERY = 16  # rows between progress messages from a worker


@dataclass
class ShardJob:
    """Everything a worker needs to write one shard (pickled to the worker process)."""

    task: ShardTask
    rows: dict[int, Row]  # only this shard's rows
    out: Path
    options: ShardOptions
    layout: KeyLayout
    publish: str | None = None  # an s3:// output: each finished shard is published there


class TarMembers:
    """Appends files to a USTAR tar with fixed metadata, so equal content gives equal bytes.

    The bytes are `tarfile`'s for the same members (tested); each header is a template with the
    name, size and checksum filled in, several times faster than tarfile's per-member work
    (which took ~5% of sharding's time)."""

    def __init__(self, fileobj: io.BufferedWriter) -> None:
        self.fileobj = fileobj
        self.offset = 0

    def add(self, name: str, data: bytes) -> None:
        header = member_header(name, len(data))
        padding = -len(data) % tarfile.BLOCKSIZE
        self.fileobj.write(header)
        self.fileobj.write(data)
        if padding:
            self.fileobj.write(bytes(padding))
        self.offset += len(header) + len(data) + padding

    def close(self) -> None:
        """tarfile's end: two zero blocks, then zeros to a whole 10240-byte record."""
        end = tar_size_after(self.offset, 0)
        self.fileobj.write(bytes(end - self.offset))
        self.offset = end


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tarfile_header(name: str, size: int) -> bytes:
    """The header `tarfile` writes for the member (its errors too, e.g. a name too long)."""
    return tar_info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


_HEADER_TEMPLATE = tarfile_header("", 0)
_CHECKSUM = slice(148, 156)  # 8 spaces while summing; then 6 octal digits, NUL, space
_SIZE = slice(124, 136)  # 11 octal digits and NUL


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a member `name` of `size` bytes, as `tarfile_header`."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or size >= 8**11 or not encoded.isascii():
        return tarfile_header(name, size)  # split names, base-256 sizes: tarfile's own rules
    header = bytearray(_HEADER_TEMPLATE)
    header[: len(encoded)] = encoded
    header[_SIZE] = b"%011o\0" % size
    header[_CHECKSUM] = b" " * 8
    header[_CHECKSUM] = b"%06o\0 " % sum(header)
    return bytes(header)


def tar_size_after(offset: int, extra: int) -> int:
    """Size of the finished tar if `extra` member bytes are added at `offset`: two 512-byte end
    blocks, then padding to tarfile's 10240-byte records."""
    return -(-(offset + extra + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def member_bytes(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members take in a tar: a 512-byte header each, data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for _, data in members)


def sample_members(
    row: Row, item: WorkItem, captions: list[str], stored: StoredImage, job: ShardJob
) -> list[tuple[str, bytes]]:
    """The tar members of every sample of one row: image, caption, metadata, per key."""
    per_caption = job.options.per == "caption"
    members: list[tuple[str, bytes]] = []
    for j, caption in enumerate(captions if per_caption else captions[:1]):
        key = job.layout.key(item.key_shard, item.first_slot + j)
        meta: dict[str, Any] = {
            "key": key,
            "image_key": row.image_key,
            "caption": caption,
            "captions": [caption] if per_caption else captions,
            "source": {"file": row.file, "row": row.index},
            "width": stored.width,
            "height": stored.height,
            "original_width": stored.original_width,
            "original_height": stored.original_height,
        }
        if per_caption:
            meta["caption_index"] = j
        meta.update(row.extra)
        members += [
            (f"{key}.{stored.ext}", stored.data),
            (f"{key}.txt", caption.encode("utf-8")),
            (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")),
        ]
    return members


def failure_record(row: Row, error: SampleError, shard: str) -> dict:
    record: dict[str, Any] = {
        "source": {"file": row.file, "row": row.index},
        "reason": error.reason,
        "message": str(error),
        "shard": shard,
    }
    if isinstance(row.image, str) and row.image:
        record["image"] = row.image
    return record


def row_captions(row: Row) -> list[str]:
    if row.problem is not None:
        raise SampleError(row.problem.reason, row.problem.message)
    captions = clean_captions(row.captions)
    if not captions:
        what = "no captions" if not row.captions else "only empty or whitespace captions"
        raise SampleError("empty_caption", f"the image has {what}")
    return captions


def write_shard(job: ShardJob, report: Callable[[int, int], None]) -> ShardRecord:
    """Write one planned shard atomically and its done-record; `report(rows, failed)` as it goes."""
    task, options = job.task, job.options
    record = ShardRecord(task.name, task.index)
    final, temporary = job.out / task.name, job.out / f"{task.name}.tmp"
    # Rows planned with no samples fail on their captions before anything is fetched.
    fetchable = [item for item in task.items if item.samples]
    loaded = fetch_in_order([job.rows[item.row].image for item in fetchable], options)
    failpoint = faults.shard_failpoint()
    pending_report = [0, 0]
    index_entries: list[list] = []  # [key, offset, length] of each sample, for random access
    try:
        with open(temporary, "wb") as handle:
            tar = TarMembers(handle)
            for position, item in enumerate(task.items):
                row = job.rows[item.row]
                try:
                    captions = row_captions(row)
                    data = next(loaded)
                    if isinstance(data, SampleError):
                        raise data
                    stored = prepare_image(data, options)
                except SampleError as exc:
                    record.failures.append(failure_record(row, exc, task.name))
                    record.rows += 1
                    pending_report = flush_report(report, pending_report, 1, 1)
                    continue
                members = sample_members(row, item, captions, stored, job)
                size_after = tar_size_after(tar.offset, member_bytes(members))
                if options.maxsize and record.count and size_after > options.maxsize:
                    record.overflow = list(task.items[position:])
                    break
                for i in range(0, len(members), 3):  # each sample: image, caption, metadata
                    index_entries.append([members[i][0].rsplit(".", 1)[0], tar.offset, 0])
                    for name, data_bytes in members[i : i + 3]:
                        tar.add(name, data_bytes)
                    index_entries[-1][2] = tar.offset - index_entries[-1][1]
                record.count += len(members) // 3
                record.rows += 1
                record.written += 1
                record.dropped_captions += len(row.captions) - len(captions)
                pending_report = flush_report(report, pending_report, 1, 0)
                faults.trigger_failpoint(failpoint, f"{task.name}:{record.count}")
            loaded.close()
            tar.close()
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:  # a full disk, say: no partial shard is left to fill it further
        temporary.unlink(missing_ok=True)
        raise
    report(*pending_report)
    if record.count == 0:
        temporary.unlink()  # a shard whose every row failed is not written
    else:
        os.replace(temporary, final)
        faults.trigger_failpoint(failpoint, f"{task.name}:renamed")
        record.bytes = final.stat().st_size
        record.sha256 = file_sha256(final)
        keys, offsets, lengths = zip(*index_entries)
        index = TarIndex(task.name, record.bytes, keys, offsets, lengths)
        write_index(index, str(index_location(str(final))))
    write_json_atomic(done_path(job.out, task.name), record_to_json(record))
    if job.publish:  # tar, index, then the done-record: a record in the store means both are there
        if record.count:
            shard_output.publish(job.out, job.publish, task.name, keep_local=False)
            faults.trigger_failpoint(failpoint, f"{task.name}:published")
            index_name = Path(index_location(task.name)).name
            shard_output.publish(job.out, job.publish, index_name, keep_local=False)
        done = done_path(job.out, task.name).relative_to(job.out)
        shard_output.publish(job.out, job.publish, str(done))
    return record


def flush_report(
    report: Callable[[int, int], None], pending: list[int], rows: int, failed: int
) -> list[int]:
    pending = [pending[0] + rows, pending[1] + failed]
    if pending[0] >= _PROGRESS_EVERY:
        report(*pending)
        return [0, 0]
    return pending
