"""Fuzzing (seeded, bounded): random byte flips and truncations in the input table and in shards
never crash the sharder or the loader, never hang them, and never lose a row or a sample without
a record. A hang ends the test process with every thread's stack (faulthandler) instead of
holding CI."""

from __future__ import annotations

import faulthandler
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.loader import LoaderConfig, LoaderDataError, build_loader
from data_pipeline.loader.reader import SAMPLE_ERRORS
from data_pipeline.loader.stream import iter_raw_samples
from data_pipeline.shard import ShardError, ShardOptions, shard_dataset
from data_pipeline.shard.sources import SourceError
from tests.data_pipeline.test_shard import good_dataset

CASES = 40  # per input kind; each is a few tens of milliseconds
OPTIONS = ShardOptions(image_size=32, maxcount=4)


@pytest.fixture(autouse=True)
def hang_guard():
    faulthandler.dump_traceback_later(300, exit=True)  # far above the whole test's run time
    yield
    faulthandler.cancel_dump_traceback_later()


def mutate(data: bytes, rng: random.Random, keep: int = 0) -> bytes:
    """Flip 1-6 bytes to random values and/or cut the end; the first `keep` bytes stay."""
    data = bytearray(data)
    kind = rng.choice(["flip", "cut", "both"])
    if kind in ("flip", "both"):
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(keep, len(data))] = rng.randrange(256)
    if kind in ("cut", "both"):
        del data[rng.randrange(keep, len(data)) :]
    return bytes(data)


def shard_or_refuse(table: Path, out: Path) -> object:
    """The sharder's result, or the one-line error it refused the input with."""
    try:
        return shard_dataset(table, out, OPTIONS)
    except (SourceError, ShardError) as exc:
        assert "\n" not in str(exc) and str(table) in str(exc) or "--" in str(exc), str(exc)
        return exc


def check_accounted(summary, out: Path) -> None:
    errors = (out / "errors.jsonl").read_text().splitlines()
    assert summary.rows == summary.written + summary.failed == summary.written + len(errors)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_samples"] == summary.samples


def content_lines(data: bytes, skip_header: bool) -> int:
    lines = data.split(b"\n")[1 if skip_header else 0 :]
    return sum(1 for line in lines if line.replace(b",", b"").strip())


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_damaged_input_tables_lose_no_row(tmp_path: Path, fmt: str) -> None:
    csv_table = good_dataset(tmp_path / "in", n=12)
    if fmt == "jsonl":
        table = csv_table.with_suffix(".jsonl")
        lines = csv_table.read_text().splitlines()[1:]
        records = [dict(zip(("image", "caption"), line.split(",", 1))) for line in lines]
        table.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        table = csv_table
    original = table.read_bytes()
    header = len(original.split(b"\n", 1)[0]) + 1 if fmt == "csv" else 0
    outcomes = Counter()
    for seed in range(CASES):
        damaged = mutate(original, random.Random(seed), keep=header)
        table.write_bytes(damaged)
        result = shard_or_refuse(table, tmp_path / f"out{seed}")
        if isinstance(result, Exception):
            outcomes["refused"] += 1
            continue
        check_accounted(result, tmp_path / f"out{seed}")
        # Every line with content is a row (written or failed), unless quotes or carriage
        # returns (which can join or split CSV records; those rows are then failed or refused).
        if fmt == "jsonl" or not (set(damaged) & {ord('"'), ord("\r")}):
            assert result.rows == content_lines(damaged, skip_header=fmt == "csv"), seed
        outcomes["failed rows" if result.failed else "clean"] += 1
    assert outcomes["failed rows"] > 0  # the damage was seen, not only survived


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> tuple[Path, Path]:
    from data_pipeline.builtin import write_tokenizer

    root = tmp_path_factory.mktemp("fuzz_shards")
    table = good_dataset(root / "in", n=12)
    shard_dataset(table, root / "shards", ShardOptions(image_size=32, maxcount=12))
    return root / "shards", write_tokenizer(root / "tokenizer")


def test_damaged_shards_are_read_with_every_bad_sample_counted(tmp_path, shard_folder) -> None:
    shards, tokenizer = shard_folder
    name = "data-000000.tar"
    original = (shards / name).read_bytes()
    keys = {s.key for s in iter_raw_samples([str(shards / name)])}
    assert len(keys) == 12
    outcomes = Counter()
    for seed in range(CASES):
        folder = tmp_path / f"case{seed}"
        shutil.copytree(shards, folder)  # manifest and index describe the undamaged tar
        (folder / name).write_bytes(mutate(original, random.Random(seed)))
        # 1. Stored order (eval, inspection): no exception, only known reasons counted.
        errors: Counter = Counter()
        streamed = list(iter_raw_samples([str(folder / name)], errors))
        assert set(errors) <= set(SAMPLE_ERRORS), errors
        assert all(s.image for s in streamed)
        # 2. Training order by the index: each of the 12 places delivers its own sample or counts
        # why it could not; a batch with no usable sample is one clear error.
        cfg = LoaderConfig(
            shards=str(folder), batch_size=4, num_workers=0, seed=seed, shuffle_window=12,
            image_size=16, max_text_len=8, tokenizer=str(tokenizer),
        )  # fmt: skip
        loader = build_loader(cfg, 0, 1)
        delivered: set[str] = set()
        try:
            for batch in loader.batches(3):
                assert batch.pixel_values.shape == (4, 3, 16, 16)
                delivered |= set(batch.keys)
        except LoaderDataError as exc:
            assert "\n" not in str(exc)
            outcomes["a batch with no usable sample"] += 1
            continue
        assert delivered <= keys  # no sample made up from damaged bytes
        counted = sum(loader.error_counts().values())
        assert len(delivered) + counted >= 12, (seed, delivered, loader.error_counts())
        outcomes["counted" if counted else "clean"] += 1
    assert outcomes["counted"] > 0
