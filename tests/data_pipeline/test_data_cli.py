"""`umt data inspect`, `umt data index` and `umt data order` (launch/data.py), through `umt`."""

from __future__ import annotations

import json

from launch.cli import main as umt
from tests.data_pipeline.loader_fixtures import write_dataset, write_tar


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


def test_order_prints_one_line_per_micro_batch_to_the_epochs_end(tmp_path, capsys):
    write_dataset(tmp_path, [5, 4, 6, 5])  # 20 samples
    lines = order_lines(capsys, str(tmp_path), "--batch-size", "2", "--grad-accum", "2")
    assert len(lines) == 10  # 5 steps of 2 micro-batches of 2
    steps, micros, keys = zip(*(line.split("\t") for line in lines))
    assert steps == tuple(str(i // 2) for i in range(10)) and micros == ("0", "1") * 5
    assert all(k.startswith("ds-img-") for line in keys for k in line.split())


def test_order_start_step_continues_the_full_listing(tmp_path, capsys):
    write_dataset(tmp_path, [5, 4, 6, 5])
    common = [str(tmp_path), "--batch-size", "3", "--workers", "2", "--seed", "3", "--sample-keys"]
    full = order_lines(capsys, *common, "--steps", "12")
    part = order_lines(capsys, *common, "--start-step", "5", "--steps", "7")
    assert [line.split("\t", 1)[1] for line in part] == [
        line.split("\t", 1)[1] for line in full[5:12]
    ]
    seen = [k for line in full[:7] for k in line.split("\t")[2].split()][:20]
    assert len(set(seen)) == 20  # the first 20 positions: every sample once (crossed into epoch 1)


def test_global_order_is_what_the_ranks_of_a_step_take_together(tmp_path, capsys):
    write_dataset(tmp_path, [5, 4, 6, 5])
    common = [str(tmp_path), "--batch-size", "2", "--world-size", "2", "--steps", "5"]
    ranks = [order_lines(capsys, *common, "--rank", str(r), "--sample-keys") for r in (0, 1)]
    global_ = order_lines(capsys, *common, "--global")
    for step, line in enumerate(global_):
        shown = line.split("\t")[1].split()
        assert (
            shown == ranks[0][step].split("\t")[2].split() + ranks[1][step].split("\t")[2].split()
        )
    # The same global steps from one rank with 4 per micro-batch.
    one = order_lines(capsys, str(tmp_path), "--batch-size", "4", "--steps", "5", "--global")
    assert one == global_


def test_index_writes_what_the_loader_reads_and_check_finds_a_changed_tar(tmp_path, capsys):
    write_dataset(tmp_path, [3, 4], manifest=False)  # shards made by another tool
    write_tar(tmp_path / "broken.tar", [])
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar" * 100)
    assert umt(["data", "index", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "broken.tar is not a readable tar" in out
    assert "3 shards: 2 indexed, 1 failed" in out
    assert "sizes.json: not written, 1 tars have no right index" in out
    index = json.loads((tmp_path / "data-000001.index.json").read_text())
    assert [s[0] for s in index["samples"]] == [f"ds-001-{i:04d}" for i in range(4)]
    (tmp_path / "broken.tar").unlink()
    assert umt(["data", "index", str(tmp_path), "--check"]) == 1
    assert "sizes.json does not exist" in capsys.readouterr().out
    assert umt(["data", "index", str(tmp_path)]) == 0
    assert "2 shards: 2 already indexed" in capsys.readouterr().out
    assert umt(["data", "index", str(tmp_path), "--check"]) == 0
    assert "2 shards: 2 right" in capsys.readouterr().out
    with open(tmp_path / "data-000000.tar", "ab") as handle:
        handle.write(b"\0" * 1024)
    assert umt(["data", "index", str(tmp_path), "--check"]) == 1
    assert "data-000000.tar: " in capsys.readouterr().out


def test_order_of_undecodable_data_ends_in_one_line(tmp_path, capsys):
    write_dataset(tmp_path, [4])
    members = [(f"bad-{i}.jpg", b"not a jpeg") for i in range(4)]
    members = [m for i in range(4) for m in (members[i], (f"bad-{i}.json", b'{"caption": "x"}'))]
    write_tar(tmp_path / "data-000000.tar", members)
    code = umt(["data", "order", str(tmp_path / "data-000000.tar"), "--batch-size", "2",
                "--decode", "--workers", "1"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data-000000.tar" in err and "corrupt_image" in err
