"""Shards in object storage: read from a real S3 endpoint (moto) and a real web server (nginx) on
loopback, through the node cache or by range requests, with failures a person can act on."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_pipeline import presigned, storage
from data_pipeline.shard_cache import ShardCache
from data_pipeline.tar_index import index_location, index_of_file, write_index
from launch.cli import main as umt
from tests.conftest import REPO
from tests.data_pipeline.loader_fixtures import keys_by_position, keys_only, write_dataset
from tests.storage_servers import BUCKET, moto_s3, nginx

COUNTS = [7, 5, 6, 4, 3, 7, 2, 6]  # 40 samples in 8 shards


def shards_with_indexes(folder: Path) -> Path:
    write_dataset(folder, COUNTS, name="remote")
    for tar in sorted(folder.glob("*.tar")):
        write_index(index_of_file(str(tar)), index_location(str(tar)))
    return folder


@pytest.fixture
def local(tmp_path) -> Path:
    return shards_with_indexes(tmp_path / "shards")


@pytest.fixture
def s3(local):
    with moto_s3() as server:
        yield server, server.upload_folder(local, "data/shards")


@pytest.fixture
def http(local, tmp_path):
    with nginx(
        local.parent, tmp_path / "nginx", fail_with_500=("/shards/data-000003.tar",)
    ) as server:
        yield server


def test_a_failure_of_an_exiting_interpreter_is_not_retried():
    """A prefetch download still queued when the process exits fails with asyncio's "cannot
    schedule new futures after shutdown" (wrapped by botocore): retried 5 times with backoff,
    it held up the exit by seconds and logged a warning per retry."""
    from botocore.exceptions import HTTPClientError

    wrapped = HTTPClientError(error=RuntimeError("cannot schedule new futures after shutdown"))
    assert storage.fatal_reason(wrapped) == "the process is exiting"
    assert storage.fatal_reason(RuntimeError("cannot schedule new futures after shutdown"))
    assert storage.fatal_reason(HTTPClientError(error=ConnectionResetError())) is None


def test_a_location_botocore_refuses_to_send_is_one_line_at_once(s3, monkeypatch):
    """A bucket name S3 cannot have, or a folder where an object is wanted: botocore refuses to
    send the request, and that was retried 6 times (~8 s of backoff) before a message of three
    lines."""
    _, url = s3
    monkeypatch.setenv("UMT_S3_PRESIGNED_READS", "0")  # every request through botocore
    retries = storage.io_counters["retries"]
    for location, reason in (
        ("s3://bad!bucket/x.json", "Invalid bucket name"),
        (url.split("/data")[0] + "/", "Invalid length for parameter Key"),
    ):
        with pytest.raises(storage.StorageError) as failed:
            storage.read_bytes(location)
        message = str(failed.value)
        assert message.startswith(f"reading {location}: not a valid S3 object: {reason}")
        assert "\n" not in message
    assert storage.io_counters["retries"] == retries


def test_moto_serves_a_range_without_reading_the_whole_object(s3):
    """The S3 stand-in of tests and benchmarks: moto 5 read a whole object for each range request
    (32 ms for 100 KB of 40 MB against 4.4 ms of 1 MB), which made range reads of large shards
    look slow in `loader_throughput.py`. A range now reads only its bytes, the same bytes."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    server, _ = s3
    data = os.urandom(3 * 2**20 + 7)
    server.client.put_object(Bucket=BUCKET, Key="big", Body=data)
    key = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(BUCKET, "big")
    buffer, read = key._value_buffer, []
    key._value_buffer = SimpleNamespace(
        seek=buffer.seek, read=lambda n=-1: read.append(n) or buffer.read(n)
    )

    def get(**kw) -> bytes:
        return server.client.get_object(Bucket=BUCKET, Key="big", **kw)["Body"].read()

    n = len(data)
    assert get(Range="bytes=5-100") == data[5:101] and read == [96]
    assert get(Range=f"bytes={n - 10}-") == data[-10:] and get(Range="bytes=-25") == data[-25:]
    assert get(Range=f"bytes=100-{n + 50}") == data[100:]
    assert read == [96, 10, 25, n - 100]
    assert get() == data and get(Range="bytes=0-1,5-6") == data  # moto's own: whole
    assert get(Range="bytes=10-5") == data  # (as moto answers it: the whole object)
    server.client.put_object(Bucket=BUCKET, Key="empty", Body=b"")
    assert (
        server.client.get_object(Bucket=BUCKET, Key="empty", Range="bytes=-5")["Body"].read() == b""
    )
    with pytest.raises(Exception, match="InvalidRange"):
        get(Range=f"bytes={n + 5}-")


def test_threads_of_a_process_share_one_s3_client(s3, monkeypatch):
    """s3fs makes its client on the first request: threads whose first requests ran together
    (a worker opening several shards at once) each made one, 0.3 s at a loader worker's start."""
    monkeypatch.setattr(storage, "_filesystems", {})
    _, url = s3
    fs = storage.filesystem(url)
    assert fs._s3 is not None  # made before any request
    assert storage.filesystem(url) is fs


def test_a_fork_while_another_thread_holds_a_storage_lock_leaves_the_child_usable():
    """A loader worker forked while a thread of its parent made the S3 client (or counted a
    download) inherited that lock held, with no thread to release it: its first request hung."""
    for lock in (storage._filesystems_lock, storage._io_lock):
        with lock:
            pid = os.fork()
            if pid == 0:  # the child: its locks are free
                free = storage._filesystems_lock.acquire(timeout=5)
                free = free and storage._io_lock.acquire(timeout=5)
                os._exit(0 if free else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_a_micro_batchs_shards_are_opened_together_and_copied_after_its_reads(
    s3, tmp_path, monkeypatch
):
    """From object storage, a micro-batch's first reads opened its shards one after the other
    (an index file, then the ranges, per shard), with the prefetch's downloads of whole shards
    already under way: its first batch took 0.75 s where webdataset's took 0.30 s (512 samples
    of 8 shards). The shards are now opened together, and copies are fetched after."""
    import threading

    import data_pipeline.loader.reader as reader_module
    import data_pipeline.loader.stream as stream_module
    from data_pipeline.loader import build_loader

    _, url = s3
    both_open = threading.Barrier(2, timeout=30)  # opened one after the other: it breaks
    real_open = reader_module._OpenShard.open.__func__
    events = []

    def open_together(cls, shard, cache, known=None, ahead=None):
        if known is None and not cache.has(shard.path):  # a first open: by its index file
            both_open.wait()
        return real_open(cls, shard, cache, known, ahead)

    real_preload = reader_module.ShardReader.preload

    def preload(self, wanted):
        events.append(("preload", len({shard for shard, _ in wanted})))
        real_preload(self, wanted)
        events.append("read")

    monkeypatch.setattr(reader_module._OpenShard, "open", classmethod(open_together))
    monkeypatch.setattr(
        stream_module.MicroBatchMaker,
        "prefetch",
        lambda self, round_index: events.append(("prefetch", round_index)),
    )
    monkeypatch.setattr(reader_module.ShardReader, "preload", preload)
    holes = []
    real_ranges = storage.read_ranges
    monkeypatch.setattr(storage, "read_ranges", lambda *a: holes.append(a[2]) or real_ranges(*a))
    cfg = keys_only(url + "/", batch_size=4, shuffle_window=8, cache_dir=str(tmp_path / "cache"))
    loader = build_loader(cfg, 0, 1)
    (batch,) = islice(loader.batches(1), 1)
    assert len(batch.keys) == 4 and not batch.errors
    # The barrier held (opened together), and the copies were asked for after the reads.
    assert events == [("preload", 2), "read", ("prefetch", 0)]
    # Bridged shards' samples within 1 MiB are one request (the copies' bytes come anyway).
    assert holes == [storage.BRIDGE_HOLE_BYTES] * 2


@pytest.mark.slow
@pytest.mark.parametrize("remote_read", ["cache", "range"])
def test_the_first_micro_batches_index_files_are_read_once_for_all_workers(
    local, tmp_path, remote_read
):
    """Each loader worker requested the index files of the shards its first micro-batch opens
    by request (the same files K times per rank, 64 times on a node of 8 ranks of 8 workers),
    the first batch's longest wait after the workers' start (65 of its 410 ms from moto,
    measured). The rank's process reads them once, together, before its workers start, for
    bridged copies and for `remote_read: range` alike; the batches are the ones the shards give
    on local disk."""
    from data_pipeline.loader import build_loader

    with nginx(local.parent, tmp_path / "nginx") as server:
        cfg = keys_only(
            f"{server.base}/shards/", batch_size=8, shuffle_window=40, num_workers=2,
            cache_dir=str(tmp_path / "cache"), remote_read=remote_read,
        )  # fmt: skip
        remote = [b.keys for b in build_loader(cfg, 0, 1).batches(2)]
        local_cfg = replace(cfg, shards=f"{local}/", cache_dir=None)
        assert remote == [b.keys for b in build_loader(local_cfg, 0, 1).batches(2)]
        shards = [{key.split("-")[1] for key in keys} for keys in remote]
        assert shards[0] & shards[1]  # both workers' first micro-batches bridge a shard
        for shard in shards[0] | shards[1]:
            assert server.requests(f"/shards/data-{int(shard):06d}.index.json") == [200]


def test_indexes_read_ahead_take_one_try_and_leave_any_failure_to_the_workers(local, tmp_path):
    """The rank's process reads ahead before its workers start: a failing store must not hold
    them back by its retries (~8 s), nor make a run fail that the workers' own reads would
    carry. One request per file (and for the tar's size where the manifest gives none); an
    index file that fails or is missing is left out, for the worker to read as before."""
    from data_pipeline.loader.dataset import Shard
    from data_pipeline.loader.reader import read_indexes_ahead

    (local / "data-000002.index.json").unlink()
    failing = ("/shards/data-000001.index.json", "/shards/data-000003.tar")
    with nginx(local.parent, tmp_path / "nginx", fail_with_500=failing) as server:
        base = f"{server.base}/shards"
        shards = [Shard(f"{base}/data-{i:06d}.tar", COUNTS[i]) for i in range(4)]  # no sizes
        found = read_indexes_ahead(shards + shards[:1])  # a shard twice: read once
        assert list(found) == [shards[0].path]
        assert found[shards[0].path] == index_of_file(str(local / "data-000000.tar"))
        for i, codes in enumerate([[200], [500], [404], [200]]):
            assert server.requests(f"/shards/data-{i:06d}.index.json") == codes
        # shard 3's index file came, its size did not: asked once
        assert server.requests("/shards/data-000003.tar", "HEAD") == [500]


def test_a_copys_index_is_the_shards_index_file_not_a_scan_of_the_copy(
    s3, local, tmp_path, monkeypatch
):
    """The prefetch that copied a shard built the copy's index by reading every tar header of it
    (73 ms of CPU for 512 samples, 1.4 s for 10,000), where the shard's index file in the store
    is one request. A stale index file (made for another size) is left for the scan."""
    import shutil

    import data_pipeline.loader.reader as reader_module
    from data_pipeline.loader.reader import copy_index

    server, url = s3
    scans = []
    real_scan = reader_module.index_of_file
    monkeypatch.setattr(reader_module, "index_of_file", lambda *a: scans.append(a) or real_scan(*a))
    cache = ShardCache(tmp_path / "cache")
    for n in (1, 2):
        copy = cache.path_for(f"{url}/data-00000{n}.tar")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local / f"data-00000{n}.tar", copy)  # as a download leaves it
    shard = f"{url}/data-000001.tar"
    held = cache.acquire(shard)
    assert copy_index(shard, held) == real_scan(shard, str(held.path)) and not scans
    assert held.index_path.is_file()  # kept for the node's other processes
    held.release()
    stale = json.loads((local / "data-000002.index.json").read_text())
    stale["bytes"] += 512
    key = "data/shards/data-000002.index.json"
    server.client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(stale).encode())
    shard = f"{url}/data-000002.tar"
    held = cache.acquire(shard)
    assert copy_index(shard, held) == real_scan(shard, str(held.path)) and len(scans) == 1
    held.release()


def test_a_copy_takes_the_index_read_while_bridging_it_without_asking_the_store_again(
    s3, local, tmp_path, monkeypatch
):
    """The prefetch that finished a copy asked the store for the shard's index file, which the
    worker had read moments before to bridge the copy: a request in the first batches' busiest
    moment (0.05-0.13 s each, measured)."""
    import data_pipeline.loader.reader as reader_module
    from data_pipeline.loader.dataset import Shard

    monkeypatch.setattr(reader_module, "_indexes_read", reader_module._IndexesRead())
    scans = []
    real_scan = reader_module.index_of_file
    monkeypatch.setattr(reader_module, "index_of_file", lambda *a: scans.append(a) or real_scan(*a))
    _, url = s3
    path = f"{url}/data-000002.tar"
    shard = Shard(path, COUNTS[2], (local / "data-000002.tar").stat().st_size)
    cache = ShardCache(tmp_path / "cache")
    bridge = reader_module._OpenShard.open(shard, cache)
    assert bridge.bridging
    held = cache.acquire(path, shard.bytes)  # the prefetch's download
    try:
        requests = storage.io_counters["requests"]
        assert reader_module.copy_index(path, held) == bridge.index
        assert storage.io_counters["requests"] == requests and not scans
    finally:
        held.release()
        bridge.close()


def test_a_copys_index_is_scanned_at_once_when_the_stores_index_file_fails(
    local, tmp_path, monkeypatch
):
    """The index file of a copied shard was requested with the store's retries: a failing
    server stalled the copy's opening for their backoff (~8 s) before the scan of the copy on
    local disk, which is never that slow. One attempt, then the scan."""
    import shutil

    import data_pipeline.loader.reader as reader_module
    from data_pipeline.loader.reader import copy_index

    scans = []
    real_scan = reader_module.index_of_file
    monkeypatch.setattr(reader_module, "index_of_file", lambda *a: scans.append(a) or real_scan(*a))
    with nginx(
        local.parent, tmp_path / "nginx", fail_with_500=("/shards/data-000001.index.json",)
    ) as server:
        shard = f"{server.base}/shards/data-000001.tar"
        cache = ShardCache(tmp_path / "cache")
        copy = cache.path_for(shard)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local / "data-000001.tar", copy)  # as a download leaves it
        held = cache.acquire(shard)
        try:
            assert copy_index(shard, held) == real_scan(shard, str(held.path))
        finally:
            held.release()
        assert len(scans) == 1  # the copy was scanned
        assert server.requests("/shards/data-000001.index.json") == [500]


def test_s3_objects_are_read_at_presigned_urls_and_a_refusal_is_read_through_s3fs(
    s3, local, tmp_path, monkeypatch, caplog
):
    """botocore's request handling cost ~2 ms of CPU per range request (a worker reads every
    sample of a shard being copied by range) and s3fs's download twice curl's per byte: an
    object's bytes are read over plain HTTP at a presigned URL (SigV4: botocore presigns with
    SigV2 by default, which buckets made since 2020 refuse), as stored (no decompression).
    Large or unsized downloads stay with s3fs (concurrent parts). A store that refuses the URL
    (another region, no presigning; a 301 with no Location is S3's answer from another region's
    endpoint, not the object) is read through s3fs, and its bucket is read so from then on once
    s3fs has succeeded; a URL's signature reaches no log."""
    server, url = s3
    caplog.set_level(logging.DEBUG, logger="fsspec")  # fsspec logs each URL it reads
    monkeypatch.setattr(storage, "_buckets_read_by_s3fs", set())
    shard = f"{url}/data-000001.tar"
    body = (local / "data-000001.tar").read_bytes()
    routes = []
    real_filesystem = storage.filesystem
    monkeypatch.setattr(
        storage,
        "filesystem",
        lambda loc, kind=None: routes.append(kind) or real_filesystem(loc, kind),
    )
    spans = [(0, 512), (1024, 700), (len(body) - 100, 100)]
    assert storage.read_ranges(shard, spans) == [body[o : o + n] for o, n in spans]
    assert storage.read_range(shard, 7, 93) == body[7:100]
    assert storage.read_bytes(shard) == body
    copy = tmp_path / "copy.tar"
    assert storage.download(shard, str(copy), len(body)) == len(body)
    assert copy.read_bytes() == body
    assert routes.count("presigned") == 4
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in real_filesystem(shard).url(shard, expires=60)
    routes.clear()
    assert storage.download(shard, str(tmp_path / "unsized.tar")) == len(body)
    assert "presigned" not in routes
    # Turned off (any usual spelling), every read goes through s3fs; a value that is neither
    # on nor off is one line, not a guess.
    for off in ("0", "false", "Off"):
        monkeypatch.setenv("UMT_S3_PRESIGNED_READS", off)
        assert storage.read_range(shard, 7, 93) == body[7:100] and "presigned" not in routes
    monkeypatch.setenv("UMT_S3_PRESIGNED_READS", "maybe")
    with pytest.raises(storage.StorageError, match="UMT_S3_PRESIGNED_READS='maybe': use 1"):
        storage.read_range(shard, 7, 93)
    monkeypatch.delenv("UMT_S3_PRESIGNED_READS")
    # A large one in concurrent parts (the last one short), each where it belongs; an object
    # larger than the manifest says is not taken for the shard.
    monkeypatch.setattr(storage, "DOWNLOAD_PART_BYTES", 1000)
    monkeypatch.setattr(storage, "DOWNLOAD_CONCURRENCY", 3)
    parts = []
    real_parts = presigned.get_in_parts
    monkeypatch.setattr(presigned, "get_in_parts", lambda *a: parts.append(a) or real_parts(*a))
    assert len(body) % 1000 and storage.download(shard, str(copy), len(body)) == len(body)
    assert copy.read_bytes() == body and len(parts) == 1
    monkeypatch.setattr(storage, "RETRIES", 1)
    with pytest.raises(storage.StorageError, match=f"the server announced {len(body)} bytes"):
        storage.download(shard, str(copy), len(body) - 1)
    with pytest.raises(storage.StorageError, match="data-000001.tar"):  # parts past its end
        storage.download(shard, str(copy), len(body) + 5000)
    packed = gzip.compress(body)
    key = "data/shards/packed.tar"
    server.client.put_object(Bucket=BUCKET, Key=key, Body=packed, ContentEncoding="gzip")
    assert storage.read_bytes(f"s3://{BUCKET}/{key}") == packed
    assert storage.read_range(f"s3://{BUCKET}/{key}", 10, 50) == packed[10:60]
    # A shard's download is not cut at aiohttp's default 5 minutes for a whole request (a
    # large shard on a slow link); a stall is 60 s without a byte, as botocore's.
    timeout = real_filesystem(shard, "presigned").client_kwargs["timeout"]
    assert timeout.total is None and timeout.sock_read == 60
    # The proxy variables are looked up on every request only where one is set (0.37 ms each).
    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    assert storage._new_filesystem("presigned", None).client_kwargs["trust_env"] is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert storage._new_filesystem("presigned", None).client_kwargs["trust_env"] is True
    with pytest.raises(storage.StorageError, match="data-000009.tar: not found"):
        storage.read_bytes(f"{url}/data-000009.tar")

    signed = "/refused/data.tar?X-Amz-Signature=secret"
    answers = {"/refused/data.tar": 403, "/moved/data.tar": 301, "/failing": 500}
    with nginx(local.parent, tmp_path / "nginx", answers=answers) as web:
        s3fs = real_filesystem(shard)
        monkeypatch.setattr(s3fs, "url", lambda path, expires: web.base + signed)
        # A 403 for a key that is not there (S3's answer without s3:ListBucket): s3fs says
        # not found, and the bucket keeps its presigned reads.
        with pytest.raises(storage.StorageError, match="data-000009.tar: not found"):
            storage.read_bytes(f"{url}/data-000009.tar")
        assert not storage._buckets_read_by_s3fs
        assert storage.read_range(shard, 7, 93) == body[7:100]  # refused, then through s3fs
        assert storage.read_bytes(shard) == body  # through s3fs at once
        assert web.requests(signed) == [403, 403] and storage._buckets_read_by_s3fs == {BUCKET}

        storage._buckets_read_by_s3fs.clear()
        moved = "/moved/data.tar?X-Amz-Signature=secret"
        monkeypatch.setattr(s3fs, "url", lambda path, expires: web.base + moved)
        assert storage.read_bytes(shard) == body  # not nginx's page for the 301
        assert web.requests(moved) == [301] and storage._buckets_read_by_s3fs == {BUCKET}

        storage._buckets_read_by_s3fs.clear()
        monkeypatch.setattr(storage, "BACKOFF_S", 0.001)
        monkeypatch.setattr(storage, "RETRIES", 2)
        monkeypatch.setattr(s3fs, "url", lambda path, expires: web.base + "/failing?sig=secret")
        with pytest.raises(storage.StorageError) as failed:
            storage.read_range(shard, 7, 93)
        assert "after 2 attempts" in str(failed.value) and "/failing?..." in str(failed.value)
    assert "secret" not in str(failed.value) + caplog.text
    assert "X-Amz-Signature" not in caplog.text and "/data-000001.tar?..." in caplog.text


def test_ranges_close_together_are_requested_as_one(s3, local, monkeypatch):
    """The samples of a shard one micro-batch reads lie a few samples apart, and each was a
    request of its own: a request's first byte costs what ~1 MB more of it does, and the store
    counts requests. Ranges at most the hole apart are one request, up to a span's size (the
    loader's hole: 1 MiB while a copy is on its way, none by range alone)."""
    _, url = s3
    shard = f"{url}/data-000001.tar"
    body = (local / "data-000001.tar").read_bytes()
    monkeypatch.setattr(storage, "RANGE_SPAN_BYTES", 3000)
    ranges = [(5000, 100), (0, 512), (600, 200), (5200, 10), (0, 512), (1500, 1600), (9000, 4000)]
    spans = [(0, 800), (1500, 3100), (5000, 5210), (9000, 13000)]
    assert storage.merge_ranges(ranges, 1000) == spans  # the third joined would span 3,100
    requests = storage.io_counters["requests"]
    assert storage.read_ranges(shard, ranges, 1000) == [body[o : o + n] for o, n in ranges]
    assert storage.io_counters["requests"] - requests == len(spans)
    # No hole (reads by range alone, every byte egress): only adjacent or overlapping ones.
    ranges = [(0, 512), (512, 100), (700, 10), (650, 60)]
    assert storage.merge_ranges(ranges) == [(0, 612), (650, 710)]
    assert storage.read_ranges(shard, ranges) == [body[o : o + n] for o, n in ranges]


def test_presigned_reads_trust_the_ca_bundle_and_fall_back_on_a_certificate_they_cannot(
    s3, local, tmp_path, monkeypatch
):
    """botocore trusts AWS_CA_BUNDLE (an on-premises store's own CA); aiohttp trusts only the
    system's. The presigned reads take the bundle; where the certificate still cannot be
    verified, they are read through s3fs (which has its own settings) instead of failing."""
    from tests.storage_servers import self_signed_certificate

    server, url = s3
    shard = f"{url}/data-000001.tar"
    body = (local / "data-000001.tar").read_bytes()
    cert, key = self_signed_certificate(tmp_path)
    with nginx(local.parent, tmp_path / "nginx", tls=(cert, key)) as web:
        signed = web.base + "/shards/data-000001.tar"
        for trusted in (True, False):
            monkeypatch.setattr(storage, "_filesystems", {})  # clients and sessions made anew
            monkeypatch.setattr(storage, "_buckets_read_by_s3fs", set())
            for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):
                monkeypatch.delenv(name, raising=False)
            if trusted:
                monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
            monkeypatch.setattr(storage.filesystem(shard), "url", lambda path, expires: signed)
            assert storage.read_range(shard, 7, 93) == body[7:100]
            assert storage._buckets_read_by_s3fs == (set() if trusted else {BUCKET})
        # Only the trusted read reached the server; the other failed its TLS handshake.
        assert web.requests("/shards/data-000001.tar") == [206]


def test_the_ca_bundle_is_loaded_once_per_process_and_file_and_inherited_by_forks(
    tmp_path, monkeypatch
):
    """Every loader worker loaded the CA bundle (~22 ms of CPU for a system's: this machine sets
    AWS_CA_BUNDLE) when its first presigned read made its session, on the first batch's path.
    It is loaded once per process and bundle file, a forked worker inherits it, and a bundle
    that changed is loaded again."""
    import ssl

    from tests.storage_servers import self_signed_certificate

    bundle, _ = self_signed_certificate(tmp_path)
    loads = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda **k: loads.append(k) or real(**k))
    presigned._ca_context.cache_clear()
    context = presigned.ca_context(str(bundle))
    assert presigned.ca_context(str(bundle)) is context and len(loads) == 1
    pid = os.fork()
    if pid == 0:  # a loader worker: the same context, nothing loaded
        os._exit(0 if presigned.ca_context(str(bundle)) is context and len(loads) == 1 else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    (tmp_path / "renewed").mkdir()
    other, _ = self_signed_certificate(tmp_path / "renewed")
    bundle.write_bytes(bundle.read_bytes() + other.read_bytes())  # a CA added to the bundle
    assert presigned.ca_context(str(bundle)) is not context and len(loads) == 2
    assert loads == [{"cafile": str(bundle)}] * 2


def test_range_reads_of_a_micro_batch_are_requested_together(s3, local, monkeypatch):
    """With `remote_read: range` every sample was one request, one after the other: a round
    trip each, 32 in turn for a micro-batch of 32. They are now requested together."""
    _, url = s3
    cfg = keys_only(
        url + "/",
        batch_size=4,
        shuffle_window=8,
        remote_read="range",
        decode_images=True,
        image_size=16,
    )
    want = keys_by_position(replace(cfg, shards=str(local)), 2, 3)
    single, together = [], []
    real_single, real_together = storage.read_range, storage.read_ranges
    monkeypatch.setattr(storage, "read_range", lambda *a: single.append(a) or real_single(*a))
    monkeypatch.setattr(
        storage,
        "read_ranges",
        lambda loc, ranges, hole: (
            together.append((ranges, hole)) or real_together(loc, ranges, hole)
        ),
    )
    assert keys_by_position(cfg, 2, 3) == want
    assert not single and sum(len(r) for r, _ in together) == 2 * 3 * 4
    assert {hole for _, hole in together} == {0}  # by range alone: no byte more than asked


def order(capsys, shards: str, *extra: str) -> tuple[int, list[str], str]:
    args = ["data", "order", shards, "--batch-size", "3", "--world-size", "2", "--workers", "2"]
    code = umt([*args, "--sample-keys", "--steps", "10", *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


@pytest.mark.slow
def test_order_from_s3_equals_the_local_order(local, s3, tmp_path, capsys):
    server, url = s3
    code, want, _ = order(capsys, str(local))
    assert code == 0 and len(want) == 10
    code, got, err = order(capsys, url, "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert got == want
    assert "downloads=" in err  # through the node cache, fetched ahead
    code, ranged, err = order(capsys, url, "--remote-read", "range")
    assert code == 0 and ranged == want, err
    assert not (tmp_path / "range-cache").exists()


@pytest.mark.slow
def test_a_mixture_from_s3_equals_the_local_mixture_and_the_node_keeps_each_copys_index(
    local, s3, tmp_path, capsys
):
    """Three sources, each read from its own window over several shards: the reader cycles over
    more shards than it first keeps open (it grows), bridged shards' indexes serve their copies,
    and each copy's index is kept beside it for the node's other processes."""
    server, url = s3

    def mixture(base: str) -> str:
        return f"a={base}/data-{{000000..000002}}.tar,b={base}/data-{{000003..000005}}.tar:x0.5,c={base}/data-{{000006..000007}}.tar:x2"  # fmt: skip

    extra = ["--shuffle-window", "12", "--steps", "8"]
    code, want, err = order(capsys, mixture(str(local)), *extra)
    assert code == 0 and len(want) == 8, err
    cache = tmp_path / "cache"
    code, got, err = order(capsys, mixture(url), *extra, "--cache-dir", str(cache))
    assert code == 0, err
    assert got == want
    copies = sorted(p.name for p in cache.glob("*/*.tar"))
    kept = sorted(p.name[: -len(".index.json")] for p in cache.glob("*/*.tar.index.json"))
    # (a copy whose prefetch was cut by the command's end may not have its index yet)
    assert copies and kept and set(kept) <= set(copies)


@pytest.mark.slow
def test_order_over_http_with_a_cache_smaller_than_two_shards(local, tmp_path, capsys):
    code, want, _ = order(capsys, str(local), "--workers", "1")
    shard_bytes = min(p.stat().st_size for p in local.glob("*.tar"))
    limit_gb = str(1.5 * shard_bytes / 2**30)
    with nginx(local.parent, tmp_path / "nginx") as http:
        code, got, err = order(
            capsys, f"{http.base}/shards/", "--workers", "1", "--cache-dir",
            str(tmp_path / "cache"), "--cache-limit-gb", limit_gb,
        )  # fmt: skip
    assert code == 0, err
    assert got == want
    # Copies not in use were removed to stay near the limit (those in use stay): the run is
    # right, only slower (evicted shards are fetched again, or read by range meanwhile).
    counts = dict(kv.rstrip(",").split("=") for kv in err.split("storage: ")[1].split())
    assert int(counts["evictions"]) > 0


@pytest.mark.slow
def test_a_server_that_keeps_failing_is_retried_then_named_in_one_line(
    local, http, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    code, _, err = order(capsys, f"{http.base}/shards/", "--cache-dir", str(tmp_path / "cache"))
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("umt data order:")]
    assert len(lines) == 1
    assert f"{http.base}/shards/data-000003.tar" in lines[0] and "after 6 attempts" in lines[0]
    # Each reader of the shard (a worker, its prefetching) tried 6 times, backing off: bounded.
    tries = http.requests("/shards/data-000003.tar", "GET")
    assert set(tries) == {500} and len(tries) % 6 == 0 and 6 <= len(tries) <= 6 * 6


@pytest.mark.slow
def test_a_shard_missing_from_the_store_is_named_in_one_line(local, s3, tmp_path, capsys):
    server, url = s3
    server.client.delete_object(Bucket=BUCKET, Key="data/shards/data-000005.tar")
    code, _, err = order(capsys, url, "--cache-dir", str(tmp_path / "cache"), "--steps", "14")
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("umt data order:") and f"{url}/data-000005.tar" in line
    assert "not found" in line


@pytest.mark.slow
def test_missing_credentials_are_one_line(local, s3, monkeypatch, capsys):
    _, url = s3
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(storage, "_filesystems", {})
    code, _, err = order(capsys, url)
    assert code == 1
    assert err.strip() == (
        f"umt data order: reading {url}/manifest.json: no usable credentials "
        "(Unable to locate credentials)"
    )


@pytest.mark.slow
def test_a_download_killed_midway_leaves_nothing_that_is_taken_for_the_shard(local, s3, tmp_path):
    _, url = s3
    shard = f"{url}/data-000001.tar"
    cache_dir = tmp_path / "cache"
    code = (
        "import sys; from data_pipeline.shard_cache import ShardCache; "
        "ShardCache(sys.argv[1]).acquire(sys.argv[2])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "UMT_FAULT_KILL_IN_DOWNLOAD": "1"}
    killed = subprocess.run([sys.executable, "-c", code, str(cache_dir), shard], env=env)
    assert killed.returncode == -9
    cache = ShardCache(cache_dir)
    copy = cache.path_for(shard)
    assert not copy.exists() and list(copy.parent.glob("*.part"))  # half a file, never the shard
    held = cache.acquire(shard)  # the dead process's lock is gone with it: no wait
    assert held.path.read_bytes() == (local / "data-000001.tar").read_bytes()
    assert not list(copy.parent.glob("*.part"))  # the leftover was cleared
    held.release()


@pytest.mark.slow
def test_index_shards_in_the_store_then_read_them_by_range(tmp_path, capsys):
    """Shards made by another tool, in S3 without indexes: `umt data index` publishes them
    beside the shards, `--check` agrees, and range reads (which need them) give the local order."""
    plain = tmp_path / "plain"
    write_dataset(plain, COUNTS, name="remote")  # tars and a manifest, no index files
    code, want, _ = order(capsys, str(plain))
    with moto_s3() as server:
        url = server.upload_folder(plain, "plain")
        code, _, err = order(capsys, url, "--remote-read", "range")
        assert code == 1 and "has no index file" in err.strip().splitlines()[-1]
        cache = ["--cache-dir", str(tmp_path / "cache")]
        assert umt(["data", "index", url, *cache]) == 0
        assert "8 shards: 8 indexed" in capsys.readouterr().out
        assert umt(["data", "index", url, "--check", *cache]) == 0
        assert "8 shards: 8 right" in capsys.readouterr().out
        code, got, err = order(capsys, url, "--remote-read", "range")
        assert code == 0 and got == want, err


@pytest.mark.slow
def test_a_remote_folder_is_read_once_and_sizes_json_shards_get_their_sizes_from_one_listing(
    local, monkeypatch
):
    """A folder of other tools' tars (sizes.json, no manifest) in S3: the shards' sizes come
    from one listing, so no process asks each shard's size again; the manifest and sizes.json
    are read once, not once more per folder of the shards."""
    from data_pipeline.loader.dataset import resolve_dataset

    (local / "manifest.json").unlink()
    reads = []
    original = storage.read_text_if_exists
    monkeypatch.setattr(
        storage, "read_text_if_exists", lambda where: reads.append(where) or original(where)
    )
    with moto_s3() as server:
        url = server.upload_folder(local, "foreign")
        dataset = resolve_dataset(url)
    assert [s.bytes for s in dataset.shards] == [
        (local / storage.basename(s.path)).stat().st_size for s in dataset.shards
    ]
    assert sorted(storage.basename(r) for r in reads) == ["manifest.json", "sizes.json"]


@pytest.mark.slow
def test_a_forked_worker_makes_its_own_s3_client_on_the_parsed_models_it_inherits(local, s3):
    """A loader worker forks from a process that has used S3. It makes its own session and
    client (credentials, connections), but on botocore's data loader (the parsed service models
    and endpoint rules) that it inherits: its client starts without parsing them again, and it
    reads as the parent does."""
    _, url = s3
    shard = f"{url}/data-000000.tar"
    size = storage.size(shard)
    parent = storage.filesystem(shard)
    models = parent.session.get_component("data_loader")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports through the pipe and leaves without pytest's teardown
        try:
            child = storage.filesystem(shard)
            own = child is not parent and child.session is not parent.session
            shared = child.session.get_component("data_loader") is models
            os.write(write_end, repr((own, shared, storage.size(shard))).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    assert report == repr((True, True, size))
