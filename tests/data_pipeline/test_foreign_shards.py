"""Shards made by other tools, taken as they are: plain WebDataset tars (image + caption, no
json, as `webdataset.ShardWriter` and open_clip's tooling write them) and a folder of
img2dataset output index, inspect, load and train."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

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


IMG2DATASET = "img2dataset==1.47.0"


def run_img2dataset(tmp_path: Path, n: int = 12) -> Path:
    """img2dataset (its own venv: it pins an old webdataset) on `n` local images named by
    file:// URLs, one more URL that does not exist; 5 samples per shard."""
    import csv

    from PIL import Image

    from tests.side_venvs import pip_venv

    python = pip_venv("img2dataset", [IMG2DATASET])
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(n + 1):
        path = tmp_path / "images" / f"{i}.png"
        if i < n:  # the last URL names no file: img2dataset leaves it out, with its reason
            Image.new("RGB", (40 + i, 30), (i * 20, 100, 200 - i * 10)).save(path)
        rows.append({"url": path.as_uri(), "caption": f"a picture number {i}"})
    with open(tmp_path / "urls.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["url", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    script = (
        "from img2dataset import download\n"
        "download(url_list='urls.csv', input_format='csv', url_col='url', caption_col='caption',"
        " output_format='webdataset', output_folder='i2d', processes_count=1, thread_count=2,"
        " image_size=32, resize_mode='center_crop', number_sample_per_shard=5,"
        " enable_wandb=False, distributor='multiprocessing')\n"
    )
    proc = subprocess.run(
        [str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "i2d"


def img2dataset_keys(folder: Path) -> list[str]:
    """The keys img2dataset says it wrote: the successes in its `.parquet` files."""
    import pyarrow.parquet as pq

    rows = [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["status"] for r in rows) == ["failed_to_download"] + ["success"] * 12
    return [r["key"] for r in rows if r["status"] == "success"]


@pytest.mark.slow
def test_img2dataset_output_indexes_inspects_and_trains_as_it_is(tmp_path):
    """Its folder (tars, `_stats.json` and `.parquet` files beside them) after `umt data index`
    trains with plain WebDataset tars in one mixture: one epoch holds every sample once."""
    from data_pipeline.builtin import write_tokenizer
    from tests.test_daily_jobs import TINY
    from tests.test_daily_jobs import umt as umt_process

    i2d = run_img2dataset(tmp_path)
    names = sorted(p.name for p in i2d.iterdir())
    assert names[:3] == ["00000.parquet", "00000.tar", "00000_stats.json"] and len(names) == 9
    proc = umt_process("data", "inspect", str(i2d), check=False)
    assert proc.returncode == 2 and f"`umt data index {i2d}` writes sizes.json" in proc.stderr
    out = umt_process("data", "index", str(i2d)).stdout
    assert "3 shards: 3 indexed" in out and "sizes.json: written (3 shards, 12 samples)" in out
    out = umt_process("data", "inspect", str(i2d), "--samples", "12").stdout
    assert "total: 12 samples" in out and "skipped" not in out
    assert "image=32x32" in out and "'a picture number 11'" in out
    wds = tmp_path / "wds"
    plain = write_with_shardwriter(wds)
    umt_process("data", "index", str(wds))
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    run = tmp_path / "run"
    umt_process(
        "train", f"output_dir={run}", f"data.train.shards={i2d},{wds}",
        f"data.tokenizer={tokenizer}", "train.steps=5", "data.log_sample_keys=true", *TINY,
    )  # fmt: skip
    trained = [k for line in (run / "sample_keys" / "rank0.txt").read_text().splitlines()
               for k in line.split()[1:]]  # fmt: skip
    # Two sources: keys come as source/key (each tool numbers its samples from 0).
    want = [f"i2d/{k}" for k in img2dataset_keys(i2d)] + [f"wds/{k}" for k in plain]
    assert sorted(trained) == sorted(want)
    assert not (run / "data_errors").exists()
