"""Tiny WebDataset shards for loader tests, written the way `umt shard` writes them (tar + manifest)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from itertools import islice
from pathlib import Path

from PIL import Image

from data_pipeline.loader import LoaderConfig, build_loader


def encode_image(index: int, size: tuple[int, int] = (16, 12), fmt: str = "JPEG") -> bytes:
    """A small image whose colour depends on `index`."""
    image = Image.new("RGB", size, ((index * 37) % 256, (index * 91) % 256, (index * 13) % 256))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def sample_members(
    key: str, index: int, image_key: str, captions: list[str]
) -> list[tuple[str, bytes]]:
    meta = {
        "key": key,
        "image_key": image_key,
        "captions": captions,
        "caption": captions[0],
        "width": 16,
        "height": 12,
    }
    return [
        (f"{key}.jpg", encode_image(index)),
        (f"{key}.txt", captions[0].encode()),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)


def write_manifest(folder: Path, counts: dict[str, int]) -> None:
    shards = []
    for name, count in counts.items():
        data = (folder / name).read_bytes()
        shards.append(
            {
                "name": name,
                "count": count,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    manifest = {"format_version": 1, "shards": shards, "total_samples": sum(counts.values())}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "sizes.json").write_text(json.dumps(counts))


def write_dataset(
    folder: Path,
    counts: list[int],
    name: str = "ds",
    captions_per_image: int = 1,
    manifest: bool = True,
) -> list[str]:
    """Shards `folder/data-NNNNNN.tar` holding counts[i] samples each; returns all sample keys.

    Keys are `{name}-{shard}-{i}`; with captions_per_image > 1, consecutive samples share an
    image key (COCO style) and each json lists all captions of the image.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys, sizes, index = [], {}, 0
    for shard, count in enumerate(counts):
        members = []
        for i in range(count):
            key = f"{name}-{shard:03d}-{i:04d}"
            image_key = f"{name}-img-{index // captions_per_image}"
            group = index // captions_per_image
            captions = [
                f"caption {c} of image {group} of {name}" for c in range(captions_per_image)
            ]
            mine = captions[index % captions_per_image]
            members += sample_members(
                key, index, image_key, [mine, *[c for c in captions if c != mine]]
            )
            keys.append(key)
            index += 1
        shard_name = f"data-{shard:06d}.tar"
        write_tar(folder / shard_name, members)
        sizes[shard_name] = count
    if manifest:
        write_manifest(folder, sizes)
    return keys


def truncate_inside(path: Path, member: str) -> None:
    """Cut a tar in the middle of `member`'s data, as a crashed copy would."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + info.size // 2])


def write_dirty_dataset(folder: Path, counts: list[int]) -> tuple[list[str], dict[str, str]]:
    """Like write_dataset (at least 4 shards of >= 5), then damaged: returns (valid keys, {bad key: reason}).

    Shard 0 sample 2: image bytes that are not an image; shard 1 sample 3: json that does not
    parse; shard 2 sample 1: no image member; shard 3: cut inside sample 3's image, so samples
    3.. of that shard are lost. The manifest keeps the undamaged counts, as after a bad copy.
    """
    keys = write_dataset(folder, counts, name="dirty")
    bad = {
        "dirty-000-0002": "corrupt_image",
        "dirty-001-0003": "bad_json",
        "dirty-002-0001": "missing_image",
    }
    bad.update({f"dirty-003-{i:04d}": "truncated_tar" for i in range(3, counts[3])})

    def rewrite(shard: int, edit) -> None:
        path = folder / f"data-{shard:06d}.tar"
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        write_tar(path, [edited for name, data in members if (edited := edit(name, data))])

    rewrite(0, lambda n, d: (n, b"\xff\xd8 not a jpeg" if n == "dirty-000-0002.jpg" else d))
    rewrite(1, lambda n, d: (n, b"{not json" if n == "dirty-001-0003.json" else d))
    rewrite(2, lambda n, d: None if n == "dirty-002-0001.jpg" else (n, d))
    truncate_inside(folder / "data-000003.tar", "dirty-003-0003.jpg")
    return [k for k in keys if k not in bad], bad


def keys_only(shards: str, **overrides) -> LoaderConfig:
    base = dict(
        shards=shards,
        batch_size=3,
        num_workers=0,
        seed=7,
        shuffle_window=12,
        tokenizer=None,
        decode_images=False,
    )
    return LoaderConfig(**{**base, **overrides})


def keys_by_position(cfg: LoaderConfig, world: int, rounds: int) -> dict[int, str]:
    """Stream position -> sample key, from every rank's loader in this process."""
    out = {}
    for rank in range(world):
        for batch in islice(iter(build_loader(cfg, rank, world)), rounds):
            out |= {batch.position + j: key for j, key in enumerate(batch.keys)}
    return out
