"""Shards made by other tools, taken as they are: plain WebDataset tars (image + caption, no
json, as `webdataset.ShardWriter` and open_clip's tooling write them) and a folder of
img2dataset output index, inspect, load and train."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from launch.cli import main as umt
from tests.data_pipeline.loader_fixtures import encode_image

# (image member, caption member, PIL format) by sample, in turn: webdataset's usual extensions.
LAYOUTS = [("jpg", "txt", "JPEG"), ("png", "caption", "PNG"), ("webp", "txt", "WEBP"),
           ("jpeg", "txt", "JPEG")]  # fmt: skip


def write_with_shardwriter(folder: Path, n: int = 8, maxcount: int = 5) -> dict[str, str]:
    """Tars of `webdataset.ShardWriter` with an image and a caption per sample (every 4th one
    a class too) and nothing else; returns {key: caption}."""
    import webdataset as wds

    folder.mkdir(parents=True)
    captions = {}
    with wds.ShardWriter(str(folder / "wds-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i in range(n):
            image_ext, text_ext, fmt = LAYOUTS[i % len(LAYOUTS)]
            key, caption = f"sample{i:04d}", f"caption number {i}"
            sample = {"__key__": key, image_ext: encode_image(i, fmt=fmt), text_ext: caption}
            if i % 4 == 3:
                sample["cls"] = i // 4
            sink.write(sample)
            captions[key] = caption
    return captions


def test_plain_webdataset_tars_index_inspect_and_load(tmp_path, capsys):
    from data_pipeline.loader import LoaderConfig, build_loader, iter_raw_samples

    folder = tmp_path / "wds"
    captions = write_with_shardwriter(folder)
    assert umt(["data", "index", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "2 shards: 2 indexed" in out and "sizes.json: written (2 shards, 8 samples)" in out
    assert json.loads((folder / "sizes.json").read_text()) == {
        "wds-000000.tar": 5,
        "wds-000001.tar": 3,
    }
    assert umt(["data", "inspect", str(folder), "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "total: 8 samples" in out and "skipped" not in out
    for key, caption in captions.items():
        assert f"{key}  image_key={key}  image=16x12" in out and repr(caption) in out
    errors: Counter = Counter()
    samples = list(iter_raw_samples(str(folder), errors))
    assert not errors and [s.meta for s in samples if s.meta] == [{"cls": "0"}, {"cls": "1"}]
    cfg = LoaderConfig(
        shards=str(folder), batch_size=4, num_workers=0, tokenizer=None, image_size=16,
        train=False, shuffle_window=4,
    )  # fmt: skip
    loader = build_loader(cfg, 0, 1)
    batches = list(loader.batches(2))
    assert sorted(k for b in batches for k in b.keys) == sorted(captions)
    assert all(captions[k] == c for b in batches for k, c in zip(b.keys, b.captions))
    assert all(b.pixel_values.shape == (4, 3, 16, 16) and not b.errors for b in batches)


def test_index_keeps_sizes_json_true_without_overwriting_anothers(tmp_path, capsys):
    folder = tmp_path / "wds"
    write_with_shardwriter(folder, n=4, maxcount=2)
    (folder / "sizes.json").write_text(json.dumps({"wds-000000.tar": 3}))  # wrong, not ours
    assert umt(["data", "index", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "sizes.json disagrees with the indexes (wds-000000.tar: 3 listed, 2 indexed)" in out
    assert json.loads((folder / "sizes.json").read_text()) == {"wds-000000.tar": 3}
    assert umt(["data", "index", str(folder), "--force"]) == 0
    assert json.loads((folder / "sizes.json").read_text()) == {
        "wds-000000.tar": 2,
        "wds-000001.tar": 2,
    }
    capsys.readouterr()
    (tmp_path / "more").mkdir()  # a shard added later: its entry is added, the others kept
    write_with_shardwriter(tmp_path / "more" / "x", n=1)
    (tmp_path / "more" / "x" / "wds-000000.tar").rename(folder / "wds-000002.tar")
    assert umt(["data", "index", str(folder), "--check"]) == 1
    out = capsys.readouterr().out
    assert "wds-000002.index.json does not exist" in out and "sizes.json: not checked" in out
    assert umt(["data", "index", str(folder)]) == 0
    assert "sizes.json: written (3 shards, 5 samples)" in capsys.readouterr().out
    assert umt(["data", "index", str(folder), "--check"]) == 0
    assert "sizes.json: right (3 shards, 5 samples)" in capsys.readouterr().out
