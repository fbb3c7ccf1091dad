"""Smoke tests of `umt data inspect` and `umt data order` (launch/data.py), through the `umt` dispatcher."""

from __future__ import annotations

from launch.cli import main as umt
from tests.data_pipeline.loader_fixtures import write_dataset


def order_lines(capsys, *args: str) -> list[str]:
    assert umt(["data", "order", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_inspect_prints_counts_and_a_few_samples(tmp_path, capsys):
    write_dataset(tmp_path / "coco", [3, 4], name="coco", captions_per_image=5)
    assert umt(["data", "inspect", str(tmp_path / "coco"), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "source coco: 2 shards, 7 samples" in out and "total: 7 samples" in out
    assert "coco-000-0000  image_key=coco-img-0  image=16x12" in out
    assert "captions=5" in out and "coco-000-0002" not in out


def test_order_prints_one_line_of_image_keys_per_batch_for_the_epoch(tmp_path, capsys):
    write_dataset(tmp_path, [5, 4, 6, 5])
    lines = order_lines(capsys, str(tmp_path), "--batch-size", "2", "--workers", "2")
    assert len(lines) == 2 * 5  # 2 workers x their shares 6 + 4 and 5 + 5, in batches of 2
    epochs, indices, keys_printed = zip(*(line.split("\t") for line in lines))
    assert set(epochs) == {"0"} and list(indices) == [str(i) for i in range(10)]
    assert all(k.startswith("ds-img-") for line in keys_printed for k in line.split())


def test_order_start_batch_continues_the_full_listing(tmp_path, capsys):
    write_dataset(tmp_path, [5, 4, 6, 5])
    common = [str(tmp_path), "--batch-size", "3", "--workers", "2", "--seed", "3", "--sample-keys"]
    full = order_lines(capsys, *common, "--batches", "12")
    part = order_lines(capsys, *common, "--start-batch", "5", "--batches", "7")
    assert part == full[5:12]
    assert {line.split("\t")[0] for line in full} == {"0", "1"}  # crossed into epoch 1


def test_order_with_too_few_shards_says_use_resampled(tmp_path, capsys):
    write_dataset(tmp_path, [5, 5])
    code = umt(["data", "order", str(tmp_path), "--batch-size", "2", "--world-size", "2"])
    assert code == 2
    assert "--resampled" in capsys.readouterr().err
    lines = order_lines(
        capsys, str(tmp_path), "--batch-size", "2", "--world-size", "2", "--resampled"
    )
    assert len(lines) == 2  # 10 samples // (2 ranks x 2 workers x 2) = 1 batch per worker
