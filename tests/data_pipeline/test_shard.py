"""The sharder: shard contents and format, failures accounted for, resume, parts, URLs, CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_pipeline.loader import resolve_dataset
from data_pipeline.shard import (
    FAILPOINT_ENV,
    SampleError,
    ShardError,
    ShardOptions,
    merge_parts,
    prepare_image,
    shard_dataset,
)
from data_pipeline.shard.write import TarMembers, tar_info
from launch import shard as shard_cli

REPO = Path(__file__).resolve().parents[2]
SMALL = ShardOptions(image_size=32, maxcount=4)


# --- inputs written by the tests ----------------------------------------------------------------


def jpeg_bytes(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A small JPEG with content that depends on `seed` (two coloured rectangles)."""
    image = Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, 128))
    image.paste((seed % 256, 255 - seed % 256, 60), (width // 4, height // 4, width // 2, height))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real, valid 1-bit PNG of width x height pixels (tiny on disk, a bomb when decoded)."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", body)
        + png_chunk(b"IEND", b"")
    )


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path


def good_dataset(folder: Path, n: int = 10) -> Path:
    """`n` JPEGs of varied sizes and a CSV pairing each with a caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(40 + 7 * i, 30 + 5 * i, seed=i))
        rows.append((f"{i}.jpg", f"picture number {i}"))
    return write_csv(folder / "pairs.csv", rows)


def bad_dataset(folder: Path) -> Path:
    """Good rows mixed with every kind of broken row a local table can have."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(64, 48, seed=1)
    (folder / "good.jpg").write_bytes(good)
    (folder / "also.jpg").write_bytes(jpeg_bytes(48, 64, seed=2))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "bomb.png").write_bytes(huge_png())
    (folder / "tiny.jpg").write_bytes(jpeg_bytes(8, 8, seed=3))
    (folder / "long.jpg").write_bytes(jpeg_bytes(200, 20, seed=4))
    table = folder / "pairs.csv"
    table.write_bytes(
        b"image,caption\n"
        b"good.jpg,a good picture\n"
        b"missing.jpg,no file here\n"
        b"corrupt.jpg,garbage bytes\n"
        b"truncated.jpg,half a jpeg\n"
        b"good.jpg,\n"
        b'good.jpg," \t "\n'
        b"good.jpg,caf\xe9 latin-1\n"
        b"bomb.png,twenty thousand squared\n"
        b"tiny.jpg,eight pixels\n"
        b"long.jpg,ten to one\n"
        b"also.jpg,another good one\n"
    )
    return table


def read_tar(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def output_files(out: Path) -> dict[str, bytes]:
    """Every file under `out` (state folder included) by relative path."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }


# --- a loopback HTTP server ---------------------------------------------------------------------


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ImageHandler)
        self.images: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.release = threading.Event()  # lets /hang answer when the test ends

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ImageHandler(BaseHTTPRequestHandler):
    server: ImageServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        if self.path == "/hang":
            self.server.release.wait(timeout=30)
            return
        if self.path == "/trickle":  # a valid header, then one byte every 0.2 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                if self.server.release.wait(timeout=0.2):
                    return
            return
        if self.path.startswith("/to/"):  # a redirect to wherever the path names
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/") :])
            self.end_headers()
            return
        if self.path.startswith("/flaky/") and self.server.hits[self.path] == 1:
            self.send_error(503)
            return
        data = self.server.images.get(self.path.rsplit("/", 1)[-1])
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- shard contents -----------------------------------------------------------------------------


def test_shards_read_back_with_tarfile_and_webdataset(tmp_path: Path) -> None:
    table = good_dataset(tmp_path / "in", n=10)
    summary = shard_dataset(table, tmp_path / "out", SMALL)
    assert (summary.rows, summary.written, summary.failed, summary.shards) == (10, 10, 0, 3)
    shards = sorted((tmp_path / "out").glob("data-*.tar"))
    assert [p.name for p in shards] == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]

    members = read_tar(shards[0])
    assert [m.name for m in members[:3]] == ["0000000.jpg", "0000000.txt", "0000000.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (946684800, 0, 0, "", "", 0o444)
    }
    dataset = wds.WebDataset([str(p) for p in shards], shardshuffle=False)
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [f"00000{s}{i}" for s in "012" for i in "0123"][:10]
    for i, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["jpg"]))
        original = (40 + 7 * i, 30 + 5 * i)
        assert sample["txt"].decode() == f"picture number {i}" == meta["caption"]
        assert meta["captions"] == [meta["caption"]]
        assert (meta["key"], meta["image_key"]) == (sample["__key__"], f"{i}.jpg")
        assert meta["source"] == {"file": "pairs.csv", "row": i}
        assert (meta["original_width"], meta["original_height"]) == original
        assert (meta["width"], meta["height"]) == image.size
        assert min(image.size) == 32  # keep_ratio: the short side becomes --image-size
    # Each shard has its index beside it (random access for the loader), exact for its tar.
    from data_pipeline.loader.reader import ShardReader
    from data_pipeline.tar_index import check_index, index_location

    for shard in shards:
        assert Path(index_location(str(shard))).is_file() and check_index(str(shard)) == []
    reader = ShardReader(tuple(resolve_dataset(str(tmp_path / "out"), False).shards))
    read = [reader.read(s, i, Counter()) for s in range(3) for i in range(4 if s < 2 else 2)]
    assert [r.key for r in read] == [s["__key__"] for s in samples]
    assert [r.image for r in read] == [s["jpg"] for s in samples]


def test_tar_members_are_the_bytes_tarfile_writes() -> None:
    """Headers come from a template: the same bytes as tarfile's for every kind of member (empty,
    a whole block, a 100-byte name; non-ASCII and long names take tarfile's own path), and a
    name USTAR cannot hold fails as it does in tarfile."""
    members = [
        ("000000001.jpg", bytes(range(256)) * 117),
        ("000000001.txt", b""),
        ("k" * 96 + ".txt", b"y" * 512),
        ("caf\u00e9.json", b"{}"),
        ("dir/" * 30 + "000.json", b"1"),
    ]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(tar_info(name, len(data)), io.BytesIO(data))
    written = io.BytesIO()
    tar_members = TarMembers(written)
    for name, data in members:
        tar_members.add(name, data)
    tar_members.close()
    assert written.getvalue() == expected.getvalue()
    assert tar_members.offset == len(expected.getvalue())
    with pytest.raises(ValueError, match="name is too long"):
        TarMembers(io.BytesIO()).add("k" * 300, b"")


def test_every_row_is_written_or_reported_with_its_reason(tmp_path: Path) -> None:
    table = bad_dataset(tmp_path / "in")
    options = replace(SMALL, min_size=16, max_aspect_ratio=5.0, maxcount=100)
    summary = shard_dataset(table, tmp_path / "out", options)
    out = tmp_path / "out"
    expected = {
        "bad_aspect_ratio": 1,
        "corrupt_image": 2,
        "decompression_bomb": 1,
        "empty_caption": 2,
        "missing_file": 1,
        "not_utf8": 1,
        "too_small": 1,
    }
    assert (summary.rows, summary.written, summary.failed) == (11, 2, 9)
    assert summary.failures == expected
    assert summary.line() == (
        "11 rows: 2 written, 9 failed (bad_aspect_ratio: 1, corrupt_image: 2, "
        "decompression_bomb: 1, empty_caption: 2, missing_file: 1, not_utf8: 1, too_small: 1); "
        f"2 samples in 1 shards -> {out}"
    )
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["source"]["row"], e["reason"]) for e in errors] == [
        (1, "missing_file"),
        (2, "corrupt_image"),
        (3, "corrupt_image"),
        (4, "empty_caption"),
        (5, "empty_caption"),
        (6, "not_utf8"),
        (7, "decompression_bomb"),
        (8, "too_small"),
        (9, "bad_aspect_ratio"),
    ]
    assert all(e["message"] and e["source"]["file"] == "pairs.csv" for e in errors)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["rows"], manifest["written"], manifest["failed"]) == (11, 2, 9)
    assert manifest["failures"] == expected
    assert manifest["total_samples"] == 2
    shard = manifest["shards"][0]
    data = (out / shard["name"]).read_bytes()
    assert (shard["bytes"], shard["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert json.loads((out / "sizes.json").read_text()) == {"data-000000.tar": 2}
    assert not list(out.glob("*.tmp"))


def test_resize_modes_and_skip_reencode() -> None:
    photo = jpeg_bytes(640, 480, seed=5)
    sizes = {
        mode: prepare_image(photo, ShardOptions(resize=mode, image_size=256))
        for mode in ("none", "keep_ratio", "center_crop", "border")
    }
    assert {mode: (s.width, s.height) for mode, s in sizes.items()} == {
        "none": (640, 480),
        "keep_ratio": (341, 256),
        "center_crop": (256, 256),
        "border": (256, 256),
    }
    bordered = Image.open(io.BytesIO(sizes["border"].data))
    assert bordered.getpixel((128, 2)) == (0, 0, 0)  # 256x192 picture centred on black
    copied = prepare_image(photo, ShardOptions(resize="none", skip_reencode=True))
    assert copied.data == photo
    as_png = prepare_image(photo, ShardOptions(image_size=64, image_format="png"))
    assert (as_png.ext, Image.open(io.BytesIO(as_png.data)).format) == ("png", "PNG")


def test_no_upscale_keeps_small_images_at_their_size() -> None:
    small = jpeg_bytes(60, 40, seed=5)

    def size(mode: str, no_upscale: bool) -> tuple[int, int]:
        stored = prepare_image(
            small, ShardOptions(resize=mode, image_size=128, no_upscale=no_upscale)
        )
        return stored.width, stored.height

    assert size("keep_ratio", False) == (192, 128)  # enlarged 3.2x by default
    assert size("keep_ratio", True) == (60, 40)
    assert size("center_crop", False) == (128, 128)
    assert size("center_crop", True) == (40, 40)
    assert size("border", True) == (128, 128)  # padded, not enlarged
    large = jpeg_bytes(400, 300, seed=6)  # larger images are reduced as before
    reduced = prepare_image(large, ShardOptions(image_size=128, no_upscale=True))
    assert (reduced.width, reduced.height) == (171, 128)


def test_exif_rotation_and_transparency_are_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buffer, "JPEG", exif=exif.tobytes())
    upright = prepare_image(buffer.getvalue(), ShardOptions(resize="none"))
    assert (upright.width, upright.height, upright.original_width) == (20, 40, 20)
    assert Image.open(io.BytesIO(upright.data)).size == (20, 40)
    buffer = io.BytesIO()
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(buffer, "PNG")
    flattened = prepare_image(buffer.getvalue(), ShardOptions(resize="none", image_format="png"))
    assert Image.open(io.BytesIO(flattened.data)).getpixel((5, 5)) == (255, 255, 255)


def test_bad_options_name_the_flag() -> None:
    with pytest.raises(ShardError, match=r"--maxcount must be > 0 \(got 0\)"):
        shard_dataset("unused.csv", "unused", ShardOptions(maxcount=0))
    with pytest.raises(ShardError, match="--part-index must be in 0..1"):
        shard_dataset("unused.csv", "unused", ShardOptions(num_parts=2, part_index=2))


def test_bomb_is_rejected_from_its_header_with_a_reason() -> None:
    with pytest.raises(SampleError) as caught:
        prepare_image(huge_png(), ShardOptions())
    assert caught.value.reason == "decompression_bomb"


def test_per_caption_and_per_image_policies_on_coco(tmp_path: Path) -> None:
    images = tmp_path / "val2017"
    images.mkdir()
    for i in (1, 2, 3):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(50, 40, seed=i))
    annotations = [{"image_id": 1, "caption": f"first {j}"} for j in range(5)]
    annotations += [{"image_id": 2, "caption": "second"}, {"image_id": 2, "caption": "  "}]
    coco = tmp_path / "captions_val2017.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
                "annotations": annotations,
            }
        )
    )
    options = replace(SMALL, image_root=str(images))
    per_image = shard_dataset(coco, tmp_path / "per_image", options)
    per_caption = shard_dataset(coco, tmp_path / "per_caption", replace(options, per="caption"))
    assert (per_image.rows, per_image.written, per_image.samples) == (3, 2, 2)
    assert (per_caption.rows, per_caption.written, per_caption.samples) == (3, 2, 6)
    assert per_image.failures == per_caption.failures == {"empty_caption": 1}
    assert per_image.dropped_captions == per_caption.dropped_captions == 1

    def metas(out: Path) -> list[dict]:
        shards = sorted(str(p) for p in out.glob("data-*.tar"))
        return [json.loads(s["json"]) for s in wds.WebDataset(shards, shardshuffle=False)]

    assert [(m["image_key"], m["captions"]) for m in metas(tmp_path / "per_image")] == [
        ("1", [f"first {j}" for j in range(5)]),
        ("2", ["second"]),
    ]
    caption_metas = metas(tmp_path / "per_caption")
    assert [(m["image_key"], m["caption"], m["caption_index"]) for m in caption_metas] == [
        *[("1", f"first {j}", j) for j in range(5)],
        ("2", "second", 0),
    ]
    # Five captions of one image: four fill shard 0, the fifth row cannot be split, so all five
    # go to shard 0's key space (a row never straddles shards) and shard 1 holds image 2.
    assert [m["key"] for m in caption_metas] == [f"000000{j}" for j in range(5)] + ["0000010"]


def test_karpathy_train_split_includes_restval(tmp_path: Path) -> None:
    (tmp_path / "val2014").mkdir()
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        (tmp_path / "val2014" / f"{i}.jpg").write_bytes(jpeg_bytes(40, 40, seed=i))
        sentences = [{"raw": f"image {i} caption {j}"} for j in range(2)]
        entries.append(
            {
                "filepath": "val2014",
                "filename": f"{i}.jpg",
                "cocoid": 100 + i,
                "split": split,
                "sentences": sentences,
            }
        )
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": entries}))
    summary = shard_dataset(karpathy, tmp_path / "out", replace(SMALL, per="caption"))
    assert (summary.rows, summary.samples) == (2, 4)
    samples = list(wds.WebDataset([str(tmp_path / "out/data-000000.tar")], shardshuffle=False))
    assert [json.loads(s["json"])["image_key"] for s in samples] == ["100", "100", "101", "101"]


def test_image_folder_with_sidecar_captions(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    (folder / "b").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(jpeg_bytes(40, 40, seed=1))
    (folder / "a.txt").write_text("an a\nanother a\n")
    (folder / "b/c.png").write_bytes(jpeg_bytes(40, 40, seed=2))  # a JPEG named .png: still read
    (folder / "b/c.txt").write_text("a c")
    (folder / "d.jpg").write_bytes(jpeg_bytes(40, 40, seed=3))  # no sidecar
    summary = shard_dataset(folder, tmp_path / "out", SMALL)
    assert (summary.rows, summary.written, summary.failures) == (3, 2, {"missing_caption": 1})
    samples = list(wds.WebDataset([str(tmp_path / "out/data-000000.tar")], shardshuffle=False))
    metas = [json.loads(s["json"]) for s in samples]
    assert [(m["image_key"], m["captions"]) for m in metas] == [
        ("a.jpg", ["an a", "another a"]),
        ("b/c.png", ["a c"]),
    ]


def test_seed_shuffles_rows_deterministically(tmp_path: Path) -> None:
    table = good_dataset(tmp_path / "in", n=8)

    def captions(out: str, seed: int | None) -> list[str]:
        shard_dataset(table, tmp_path / out, replace(SMALL, seed=seed, maxcount=100))
        shard = str(tmp_path / out / "data-000000.tar")
        return [s["txt"].decode() for s in wds.WebDataset([shard], shardshuffle=False)]

    unshuffled = captions("none", None)
    assert unshuffled == [f"picture number {i}" for i in range(8)]
    assert captions("a", 3) == captions("b", 3) != unshuffled
    assert sorted(captions("c", 4)) == sorted(unshuffled)


def test_maxsize_rolls_rows_over_into_overflow_shards(tmp_path: Path) -> None:
    table = good_dataset(tmp_path / "in", n=12)
    options = replace(SMALL, maxcount=6, maxsize=20_480)  # two 10 KiB tar records
    summary = shard_dataset(table, tmp_path / "out", options)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert summary.samples == 12 and summary.failed == 0
    assert all(shard["bytes"] <= 20_480 for shard in manifest["shards"])
    names = [shard["name"] for shard in manifest["shards"]]
    assert names[:2] == ["data-000000.tar", "data-000001.tar"] and len(names) > 2
    assert names[2:] == [f"data-{i:06d}.tar" for i in range(2, len(names))]  # overflow, numbered on
    shards = [str(tmp_path / "out" / name) for name in names]
    keys = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]
    assert sorted(keys) == sorted(f"00000{s}{i}" for s in "01" for i in range(6))
    again = shard_dataset(table, tmp_path / "again", options)
    assert again.shards == summary.shards
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


@pytest.mark.slow
def test_url_inputs_over_loopback_http(tmp_path: Path, image_server: ImageServer) -> None:
    image_server.images = {"cat.jpg": jpeg_bytes(60, 40, seed=7), "dog.jpg": jpeg_bytes(40, 60, 8)}
    base = image_server.base
    rows = [
        {"url": f"{base}/img/cat.jpg", "caption": "a cat"},
        {"url": f"{base}/img/gone.jpg", "caption": "a 404"},
        {"url": f"{base}/hang", "caption": "never answers"},
        {"url": f"{base}/flaky/dog.jpg", "caption": "503, then a dog"},
        {"url": f"{base}/img/cat.jpg", "caption": "too big for the limit"},
    ]
    table = tmp_path / "urls.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = replace(SMALL, timeout_s=1.0, retries=1, maxcount=100)
    summary = shard_dataset(table, tmp_path / "out", options)
    assert (summary.rows, summary.written) == (5, 3)
    assert summary.failures == {"http_404": 1, "timeout": 1}
    assert image_server.hits["/flaky/dog.jpg"] == 2 and image_server.hits["/img/gone.jpg"] == 1
    samples = list(wds.WebDataset([str(tmp_path / "out/data-000000.tar")], shardshuffle=False))
    keys = [json.loads(s["json"])["image_key"] for s in samples]
    assert keys == [f"{base}/img/cat.jpg", f"{base}/flaky/dog.jpg", f"{base}/img/cat.jpg"]
    limited = replace(options, max_download_bytes=100, timeout_s=5.0, retries=0)
    table.write_text(json.dumps(rows[0]) + "\n")
    assert shard_dataset(table, tmp_path / "limited", limited).failures == {"too_large": 1}


@pytest.mark.slow
def test_a_trickling_download_is_cut_at_its_deadline(
    tmp_path: Path, image_server: ImageServer
) -> None:
    """--timeout bounds each read; a server sending a byte every 0.2 s never trips it, so a
    download has a deadline of its own (1000 bytes would take 200 s here)."""
    table = tmp_path / "urls.jsonl"
    table.write_text(json.dumps({"url": f"{image_server.base}/trickle", "caption": "slow"}) + "\n")
    options = replace(SMALL, timeout_s=5.0, retries=0, download_deadline_s=1.0)
    summary = shard_dataset(table, tmp_path / "out", options)
    assert (summary.rows, summary.failures) == (1, {"timeout": 1})
    error = json.loads((tmp_path / "out" / "errors.jsonl").read_text())
    assert "not complete within --download-deadline 1 s" in error["message"]


@pytest.mark.slow
def test_redirects_are_followed_to_http_only(tmp_path: Path, image_server: ImageServer) -> None:
    secret = tmp_path / "secret.jpg"  # a local file a redirect must not read into a shard
    secret.write_bytes(jpeg_bytes(40, 40, seed=9))
    image_server.images = {"cat.jpg": jpeg_bytes(60, 40, seed=7)}
    base = image_server.base
    rows = [
        {"url": f"{base}/to/file://{secret}", "caption": "to a local file"},
        {"url": f"{base}/to/ftp://127.0.0.1:9/x.jpg", "caption": "to ftp, which urllib follows"},
        {"url": f"{base}/to/{base}/img/cat.jpg", "caption": "to another http url"},
    ]
    table = tmp_path / "urls.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = shard_dataset(table, tmp_path / "out", replace(SMALL, retries=0, maxcount=100))
    assert (summary.rows, summary.written, summary.failures) == (3, 1, {"bad_redirect": 2})
    lines = (tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    messages = [json.loads(line)["message"] for line in lines]
    assert f"redirected to file://{secret}" in messages[0]
    assert "redirected to ftp://127.0.0.1:9/x.jpg" in messages[1]


# --- resume, refusal, parts ---------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`umt shard ARGS` in its own process group, so a failpoint's SIGKILL hits only that run."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-m", "launch.cli", "shard", *args, "--no-progress"]
    return subprocess.run(
        command,
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "workers"), [("2", "1"), ("renamed", "2")])
def test_resume_after_kill_is_byte_identical(tmp_path: Path, kill_at: str, workers: str) -> None:
    table = bad_dataset(tmp_path / "in")
    with open(table, "a") as handle:  # enough good rows for several full shards
        handle.writelines(f"good.jpg,good again {i}\n" for i in range(9))
    args = [str(table), "--image-size", "32", "--maxcount", "3", "--seed", "1"]
    args += ["--workers", workers]
    reference = run_cli(*args, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    manifest = json.loads((tmp_path / "reference/manifest.json").read_text())
    shard = [s["name"] for s in manifest["shards"] if s["count"] >= 2][1]  # not the first one

    out = tmp_path / "resumed"
    killed = run_cli(*args, "--out", str(out), env={FAILPOINT_ENV: f"{shard}:{kill_at}"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert not (out / f".umt-shard/done/{shard}.json").exists()
    if kill_at == "2":  # killed while writing: only the temporary exists
        assert (out / f"{shard}.tmp").is_file() and not (out / shard).exists()
    else:  # killed between the rename and the done-record
        assert (out / shard).is_file()
    # What a kill leaves when another worker is writing an index or a done-record at that moment
    # (those of 2 workers sometimes are): temporaries named for a process that is gone.
    index = shard.replace(".tar", ".index.json")
    (out / f"{index}.99999999.tmp").write_text('{"half": ')
    (out / f".umt-shard/done/.{shard}.json.99999999.tmp").write_bytes(b"")

    resumed = run_cli(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    if workers == "1":  # with 2 workers, whether the other finished a shard first is timing
        assert "already done" in resumed.stdout
    assert resumed.stdout.split(";")[0] == reference.stdout.split(";")[0]
    assert output_files(out) == output_files(tmp_path / "reference")


@pytest.mark.slow
def test_two_workers_write_the_same_bytes_as_one(tmp_path: Path) -> None:
    table = good_dataset(tmp_path / "in", n=12)
    shard_dataset(table, tmp_path / "one", SMALL)
    shard_dataset(table, tmp_path / "two", replace(SMALL, workers=2))
    assert output_files(tmp_path / "one") == output_files(tmp_path / "two")


def test_finished_output_is_skipped_and_unchanged(tmp_path: Path) -> None:
    table = good_dataset(tmp_path / "in", n=6)
    first = shard_dataset(table, tmp_path / "out", SMALL)
    before = output_files(tmp_path / "out")
    second = shard_dataset(table, tmp_path / "out", SMALL)
    assert (first.resumed_shards, second.resumed_shards) == (0, 2)
    assert output_files(tmp_path / "out") == before


def test_other_input_or_shard_size_is_refused_until_overwrite(tmp_path: Path) -> None:
    table = good_dataset(tmp_path / "in", n=6)
    out = tmp_path / "out"
    shard_dataset(table, out, SMALL)
    with pytest.raises(ShardError, match="--maxcount was 4, now 3.*pass --overwrite"):
        shard_dataset(table, out, replace(SMALL, maxcount=3))
    other = write_csv(tmp_path / "in/other.csv", [("0.jpg", "something else")])
    with pytest.raises(
        ShardError, match=f"the input was {table}, now {other} \\(6 rows then, 1 now\\)"
    ):
        shard_dataset(other, out, SMALL)
    edited = table.read_text().replace("picture number 1", "a different caption")
    table.write_text(edited)
    with pytest.raises(
        ShardError, match=f"{table} changed since that run \\(6 rows then and now, other"
    ):
        shard_dataset(table, out, SMALL)
    summary = shard_dataset(other, out, replace(SMALL, overwrite=True))
    assert summary.rows == 1 and sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar"]


def test_another_image_root_is_named_as_the_difference(tmp_path: Path) -> None:
    """The same table read with another --image-root: the option is what changed, not the file."""
    table = good_dataset(tmp_path / "in", n=3)
    shutil.copytree(tmp_path / "in", tmp_path / "copy")
    out = tmp_path / "out"
    shard_dataset(table, out, replace(SMALL, image_root=str(tmp_path / "in")))
    with pytest.raises(ShardError) as caught:
        shard_dataset(table, out, replace(SMALL, image_root=str(tmp_path / "copy")))
    assert caught.value.differences == [
        f"--image-root was {tmp_path / 'in'}, now {tmp_path / 'copy'}"
    ]


def test_folder_with_foreign_shards_is_refused(tmp_path: Path) -> None:
    table = good_dataset(tmp_path / "in", n=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/data-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(ShardError, match="did not make"):
        shard_dataset(table, tmp_path / "out", SMALL)


def test_parts_merged_equal_a_single_run(tmp_path: Path) -> None:
    table = bad_dataset(tmp_path / "in")
    options = replace(SMALL, maxcount=2, seed=0)
    single = shard_dataset(table, tmp_path / "single", options)
    parts = tmp_path / "parts"
    for index in range(3):
        shard_dataset(table, parts, replace(options, num_parts=3, part_index=index))
    assert not (parts / "manifest.json").exists()
    merged = merge_parts([parts], parts)
    assert merged.line().split(" -> ")[0] == single.line().split(" -> ")[0]
    for name in ("manifest.json", "sizes.json", "errors.jsonl"):
        assert (parts / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    for tar in (tmp_path / "single").glob("*.tar"):
        assert (parts / tar.name).read_bytes() == tar.read_bytes()


@pytest.mark.slow
def test_parts_published_to_s3_merge_there_into_a_single_runs_output(tmp_path: Path) -> None:
    """A job array writing to s3://: each part publishes its shards, the merge job joins them
    in the store; the result equals a single local run's."""
    from tests.storage_servers import BUCKET, moto_s3

    table = bad_dataset(tmp_path / "in")
    options = replace(SMALL, maxcount=2, seed=0)
    single = shard_dataset(table, tmp_path / "single", options)
    with moto_s3() as s3:
        url = f"s3://{BUCKET}/parts"
        for index in range(3):
            staging = str(tmp_path / f"staging{index}")  # each task on its own node
            shard_dataset(
                table, url, replace(options, num_parts=3, part_index=index, staging=staging)
            )
        assert "parts/manifest.json" not in s3.objects("parts/")
        merged = merge_parts([url], url)
        assert merged.line().split(" -> ") == [single.line().split(" -> ")[0], url]
        objects = s3.objects("parts/")
    for name in ("manifest.json", "sizes.json", "errors.jsonl"):
        assert objects[f"parts/{name}"] == (tmp_path / "single" / name).read_bytes()
    for tar in (tmp_path / "single").glob("*.tar"):
        assert objects[f"parts/{tar.name}"] == tar.read_bytes()


def test_merge_names_the_missing_part(tmp_path: Path) -> None:
    table = good_dataset(tmp_path / "in", n=6)
    shard_dataset(table, tmp_path / "p", replace(SMALL, maxcount=1, num_parts=3, part_index=1))
    with pytest.raises(ShardError, match=r"parts \[0, 2\] of 3 are missing"):
        merge_parts([tmp_path / "p"], tmp_path / "p")


# --- the command line ---------------------------------------------------------------------------


def test_cli_prints_the_summary_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = good_dataset(tmp_path / "in", n=3)
    out = tmp_path / "out"
    args = [
        str(table),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--maxsize",
        "1MB",
        "--no-progress",
    ]
    assert shard_cli.main(args) == 0
    assert (
        capsys.readouterr().out == f"3 rows: 3 written, 0 failed; 3 samples in 1 shards -> {out}\n"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["args"]["maxsize"], manifest["args"]["image_size"]) == (1_000_000, 32)


def test_cli_reports_a_missing_column_and_an_empty_input(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    table = good_dataset(tmp_path / "in", n=1)
    assert shard_cli.main([str(table), "--out", str(tmp_path / "o"), "--caption-col", "alt"]) == 2
    assert "umt shard: error:" in capsys.readouterr().err
    empty = write_csv(tmp_path / "empty.csv", [])
    assert shard_cli.main([str(empty), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.endswith("has no rows: nothing to shard\n")
    assert not (tmp_path / "o").exists()


def test_cli_exits_1_when_every_row_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = write_csv(tmp_path / "pairs.csv", [("missing.jpg", "nothing there")])
    assert shard_cli.main([str(table), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("1 rows: 0 written, 1 failed (missing_file: 1); 0 samples")
    assert "every row failed" in captured.err


def test_slurm_array_variables_choose_the_part() -> None:
    env = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert shard_cli.slurm_part_defaults(env) == (4, 2)
    assert shard_cli.slurm_part_defaults({}) == (1, 0)
    assert (
        shard_cli.parse_bytes("1.5GiB") == 1610612736
        and shard_cli.parse_bytes("500MB") == 500 * 10**6
    )


def test_additional_columns_land_in_the_sample_json(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "0.jpg").write_bytes(jpeg_bytes(40, 30, seed=0))
    (folder / "1.jpg").write_bytes(jpeg_bytes(40, 30, seed=1))
    rows = [
        {"image": "0.jpg", "caption": "a red cat", "negative": "a blue cat", "id": 3},
        {"image": "1.jpg", "caption": "a dog", "negative": ["a cat", "a fox"], "id": 4},
    ]
    table = folder / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = replace(SMALL, save_additional_columns=("negative", "id"))
    shard_dataset(table, tmp_path / "out", options)
    samples = list(wds.WebDataset(str(tmp_path / "out" / "data-000000.tar"), shardshuffle=False))
    metas = [json.loads(s["json"]) for s in samples]
    assert [(m["caption"], m["negative"], m["id"]) for m in metas] == [
        ("a red cat", "a blue cat", 3),
        ("a dog", ["a cat", "a fox"], 4),
    ]
    # The columns are part of the run: a rerun without them is refused, not mixed in.
    with pytest.raises(ShardError, match="--save-additional-columns was"):
        shard_dataset(table, tmp_path / "out", SMALL)
    with pytest.raises(
        ShardError, match="cannot replace the sample json's own fields \\(caption\\)"
    ):
        shard_dataset(
            table, tmp_path / "other", replace(SMALL, save_additional_columns=("caption",))
        )


def test_cli_parses_additional_columns() -> None:
    options = shard_cli.options_from_args(
        shard_cli.build_parser({}).parse_args(
            ["t.csv", "--out", "o", "--save-additional-columns", "neg, id"]
        )
    )
    assert options.save_additional_columns == ("neg", "id")
    with pytest.raises(SystemExit):
        shard_cli.build_parser({}).parse_args(
            ["t.csv", "--out", "o", "--save-additional-columns", "a,,b"]
        )


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["2", "renamed", "published"])
def test_sharding_to_s3_killed_then_rerun_equals_an_uninterrupted_run(tmp_path, kill_at):
    """`--out s3://...` on moto's S3 endpoint: killed while writing a shard, after its rename, or
    after its tar was published (its done-record not yet), then rerun from another staging
    folder (another node): the store ends up byte for byte as after an uninterrupted run."""
    from tests.storage_servers import BUCKET, moto_s3

    table = bad_dataset(tmp_path / "in")
    with open(table, "a") as handle:
        handle.writelines(f"good.jpg,good again {i}\n" for i in range(9))
    args = [str(table), "--image-size", "32", "--maxcount", "3", "--seed", "1", "--workers", "1"]
    with moto_s3() as s3:
        reference = run_cli(
            *args, "--out", f"s3://{BUCKET}/reference", "--staging", str(tmp_path / "s0")
        )
        assert reference.returncode == 0, reference.stderr
        want = {k.removeprefix("reference/"): v for k, v in s3.objects("reference/").items()}
        manifest = json.loads(want["manifest.json"])
        shard = [s["name"] for s in manifest["shards"] if s["count"] >= 2][1]
        url = f"s3://{BUCKET}/resumed"
        killed = run_cli(
            *args, "--out", url, "--staging", str(tmp_path / "s1"),
            env={FAILPOINT_ENV: f"{shard}:{kill_at}"},
        )  # fmt: skip
        assert killed.returncode == -signal.SIGKILL
        published = s3.objects("resumed/")
        assert "resumed/manifest.json" not in published
        assert f"resumed/.umt-shard/done/{shard}.json" not in published
        resumed = run_cli(*args, "--out", url, "--staging", str(tmp_path / "s2"))
        assert resumed.returncode == 0, resumed.stderr
        assert "already done" in resumed.stdout and url in resumed.stdout
        got = {k.removeprefix("resumed/"): v for k, v in s3.objects("resumed/").items()}
        assert got.keys() == want.keys() and got == want
        assert {f"{shard}", shard.replace(".tar", ".index.json"), "manifest.json"} <= got.keys()


def test_a_dead_writers_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    """A run killed mid-write leaves `.NAME.PID.tmp`; its rerun removes it (found by the curation
    kill -9 test), never a concurrent writer's."""
    from data_pipeline.shard.manifest import remove_dead_writers_temporaries

    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    dead = tmp_path / f".table.parquet.{no_such_pid}.tmp"
    live = tmp_path / f".other.parquet.{os.getpid()}.tmp"
    mine = tmp_path / "table.parquet"
    for path in (dead, live, mine):
        path.write_bytes(b"x")
    users = tmp_path / f".notes.txt.{no_such_pid}.tmp"  # not a table: kept under the pattern
    users.write_bytes(b"x")
    assert remove_dead_writers_temporaries(tmp_path, ".*.parquet.*.tmp") == [dead]
    assert live.exists() and mine.exists() and users.exists() and not dead.exists()
