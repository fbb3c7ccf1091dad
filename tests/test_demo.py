"""`umt demo` end to end at a reduced size: every stage's output exists, is readable, and resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run_demo(out, *extra):
    cmd = [sys.executable, "-m", "launch.cli", "demo", "--out", str(out), "--ranks", "2",
           "--train-size", "160", "--test-size", "40", "--steps", "6", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def shape(tree):
    """The keys of a nested mapping, all the way down (values left out)."""
    return {k: shape(v) for k, v in tree.items()} if isinstance(tree, dict) else None


def test_demo_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo(
        out, "train.micro_batch_size=8", "checkpoint.every_steps=3", "log.every_steps=3"
    )
    for split in ("train", "val", "test"):
        manifest = json.loads((out / "shards" / split / "manifest.json").read_text())
        assert manifest["failed"] == 0 and manifest["total_samples"] > 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "train" / "checkpoints" / "latest").read_text() == "step6"
    assert list((out / "train" / "tensorboard").glob("events.out.tfevents.*"))
    # The demo's objectives all ran through DeepSpeed: the data's negatives and MLM included.
    from tests.test_train import scalars

    for tag in ("loss/itc", "loss/itm", "loss/mlm", "itm/accuracy_data_negatives"):
        assert scalars(out / "train", tag), tag
    results = json.loads((out / "results.json").read_text())
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert 0 <= results["retrieval_itc"][f"{direction}_r{k}"] <= 100
    assert results["images"] == 40 and results["texts"] == 120 and results["steps"] == 6
    itm = results["itm_hard_negatives"]
    rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    assert itm["pairs"] == sum(len(row["negatives"]) for row in rows)
    assert itm["pairs"] == sum(r["pairs"] for r in itm["by_type"].values())
    assert itm["attribute_swaps"]["pairs"] == sum(
        r["pairs"] for kind, r in itm["by_type"].items() if kind.endswith("_swap")
    )
    for r in (itm, itm["attribute_swaps"], *itm["by_type"].values()):
        assert r["pairs"] == 0 or 0 <= r["accuracy"] <= 100 and 0 <= r["preference"] <= 100
    assert "relation flip" in proc.stdout and "attribute swaps" in proc.stdout
    assert results["chance"]["t2i_r1"] == pytest.approx(100 / 40)
    with Image.open(out / "retrieval_examples.png") as png:
        assert png.size[0] > 400 and png.size[1] > 300
    assert "umt export" in proc.stdout and f"umt train --resume {out / 'train'}" in proc.stdout
    assert "--nproc-per-node 2" in proc.stdout and "<more>" not in proc.stdout
    # The README's figures come from docs/demo_results.json: the demo still writes that format.
    recorded = json.loads((REPO / "docs" / "demo_results.json").read_text())
    assert shape(results) == shape(recorded)
    # The demo's evaluation is on the model card of an export, as the trainer's would be.
    exported = subprocess.run(
        [sys.executable, "-m", "launch.cli", "export", str(out / "train"), str(out / "export")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = (out / "export" / "README.md").read_text()
    assert "Retrieval at step 6" in card and "No evaluation ran" not in card

    # The same --out again: data and shards are reused and training resumes, not restarts.
    again = run_demo(out, "train.micro_batch_size=8", "checkpoint.every_steps=3", "train.steps=8")
    assert "resumed from" in again.stderr and "step6" in again.stderr
    assert (out / "train" / "checkpoints" / "latest").read_text() == "step8"


def test_an_out_folder_of_other_data_or_options_is_refused_in_one_line(tmp_path):
    from launch.demo import make_data

    sizes = {"train": 40, "val": 4, "test": 4}
    make_data(tmp_path, sizes, 32, 1)
    table = tmp_path / "data" / "test.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    rows[0]["negatives"] = ["a small red circle"]  # as if an older version had drawn other ones
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit, match=r"shards/test was written from other data") as refused:
        make_data(tmp_path, sizes, 32, 1)
    assert "test.jsonl" in str(refused.value) and "--overwrite" not in str(refused.value)
    with pytest.raises(SystemExit, match=r"shards/train was written from other data .*maxcount"):
        make_data(tmp_path, sizes, 32, 2)  # another --ranks: other shard sizes
