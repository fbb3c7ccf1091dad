"""Tiny evaluation-style shards written directly with tarfile + PIL (no dependency on `umt shard`)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "cyan"]
RGB = {
    "red": (220, 20, 20),
    "green": (20, 200, 20),
    "blue": (20, 20, 220),
    "yellow": (230, 230, 20),
    "purple": (140, 20, 160),
    "orange": (250, 140, 0),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "gray": (128, 128, 128),
    "cyan": (0, 220, 220),
}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_color_shards(
    folder: Path, n_images: int = 8, per_shard: int = 4, captions: int = 2
) -> Path:
    """`data-00000N.tar` + manifest.json: image i is a solid colour with `captions` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, n_images, per_shard):
        name = f"data-{s // per_shard:06d}.tar"
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s, min(s + per_shard, n_images)):
                color = COLORS[i % len(COLORS)]
                key = f"{i:09d}"
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), RGB[color]).save(buf, "PNG")
                caps = [f"a {color} picture", f"something {color} number {i}"][:captions]
                meta = {"key": key, "image_key": f"img{i}", "captions": caps, "caption": caps[0]}
                _add(tar, f"{key}.png", buf.getvalue())
                _add(tar, f"{key}.txt", caps[0].encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        count = min(per_shard, n_images - s)
        shards.append({"name": name, "count": count, "bytes": (folder / name).stat().st_size})
    manifest = {"format_version": 1, "shards": shards, "total_samples": n_images}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "sizes.json").write_text(json.dumps({s["name"]: s["count"] for s in shards}))
    return folder
