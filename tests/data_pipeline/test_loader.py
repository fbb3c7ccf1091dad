"""Tests of data_pipeline/loader/: shard specs, the global order, tar indexes and reading, bad
data, state, and the multi-rank contracts (exactly once, same stream on any topology, resume,
mixing) under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loader import (
    Batch,
    LoaderConfig,
    LoaderConfigError,
    LoaderDataError,
    LoaderStateError,
    build_loader,
    resolve_dataset,
)
from data_pipeline.loader.batch import DecodedSample, collate_batch, fill_slots
from data_pipeline.loader.dataset import expand_braces, parse_source_specs
from data_pipeline.loader.order import GlobalOrder, plan_epoch
from data_pipeline.loader.reader import RawSample, ShardReader, read_tar_samples
from data_pipeline.tar_index import (
    TarIndexError,
    _split_with_tarfile,
    check_index,
    index_location,
    index_of_file,
    load_index,
    split_members,
    write_index,
)
from tests.conftest import REPO, run_torchrun
from tests.data_pipeline.loader_fixtures import (
    add_member,
    keys_by_position,
    keys_only,
    sample_members,
    truncate_inside,
    write_dataset,
    write_dirty_dataset,
    write_tar,
)

CLEAN_COUNTS = [7, 5, 6, 4, 3, 7, 2, 6]  # 40 samples, unequal shards


# ------------------------------------------------------------------ shard specs and counts


def test_expand_braces_ranges_and_lists():
    assert expand_braces("d/x-{000..002}.tar") == ["d/x-000.tar", "d/x-001.tar", "d/x-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("x-{8..10}") == ["x-8", "x-9", "x-10"]


def test_source_specs_take_names_weights_and_braces_with_commas():
    specs = parse_source_specs("coco=/d/c-{0,1}.tar:1,/d/cc3m:4.5")
    assert [(s.name, s.location, s.weight) for s in specs] == [
        ("coco", "/d/c-{0,1}.tar", 1.0),
        (None, "/d/cc3m", 4.5),
    ]


def test_weights_need_resampled_mode(tmp_path):
    write_dataset(tmp_path / "a", [3])
    with pytest.raises(LoaderConfigError, match="only applies with resampled"):
        build_loader(keys_only(f"{tmp_path / 'a'}:2"), 0, 1)


def test_folder_without_manifest_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, [3], manifest=False)
    with pytest.raises(LoaderConfigError, match="no manifest.json"):
        resolve_dataset(str(tmp_path), resampled=False)


def test_pattern_without_manifest_counts_from_the_tar_headers(tmp_path):
    write_dataset(tmp_path, [3, 4], manifest=False)
    dataset = resolve_dataset(str(tmp_path / "data-{000000..000001}.tar"), resampled=False)
    assert [s.count for s in dataset.shards] == [3, 4]


def test_pattern_uses_manifest_counts_beside_it(tmp_path):
    write_dataset(tmp_path, [3, 4])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["count"] = 99  # the manifest is trusted over reading
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    dataset = resolve_dataset(str(tmp_path / "data-{000000..000001}.tar"), resampled=False)
    assert [s.count for s in dataset.shards] == [3, 99]


def test_manifest_of_unknown_format_version_is_refused(tmp_path):
    write_dataset(tmp_path, [3])
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 9, "shards": []}))
    with pytest.raises(LoaderConfigError, match="format_version 9"):
        resolve_dataset(str(tmp_path), resampled=False)


def test_missing_shard_file_is_named(tmp_path):
    write_dataset(tmp_path, [3, 3])
    os.remove(tmp_path / "data-000001.tar")
    with pytest.raises(LoaderConfigError, match="data-000001.tar"):
        resolve_dataset(str(tmp_path), resampled=False)


def test_bad_config_values_name_the_field():
    for field_name, value in [
        ("batch_size", 0),
        ("shuffle_window", 0),
        ("epoch_tail", "pad"),
        ("caption", "all"),
        ("crop_scale", (0.9, 0.5)),
    ]:
        with pytest.raises(LoaderConfigError, match=field_name):
            replace(keys_only("x"), **{field_name: value}).validate()


# ------------------------------------------------------------------ the global order


def test_an_epoch_is_a_permutation_of_every_sample_and_the_next_one_another(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    cfg = keys_only(str(tmp_path))
    order = GlobalOrder(resolve_dataset(cfg.shards, False), cfg)
    ids0, epochs0 = order.samples(0, 40)
    ids1, epochs1 = order.samples(40, 40)
    assert sorted(ids0.tolist()) == list(range(40)) == sorted(ids1.tolist())
    assert set(epochs0.tolist()) == {0} and set(epochs1.tolist()) == {1}
    assert ids0.tolist() != ids1.tolist()
    # Any piece of the stream is computed alone, the same as in one go.
    again = GlobalOrder(resolve_dataset(cfg.shards, False), cfg)
    assert again.samples(33, 14)[0].tolist() == np.concatenate([ids0, ids1])[33:47].tolist()


def test_samples_are_shuffled_within_windows_of_whole_shards(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    cfg = keys_only(str(tmp_path), shuffle_window=12)
    dataset = resolve_dataset(cfg.shards, False)
    plan = plan_epoch(dataset, cfg, epoch=0)
    order = GlobalOrder(dataset, cfg)
    bounds = plan.window_starts.tolist()
    assert bounds[0] == 0 and bounds[-1] == 40 and len(bounds) >= 3
    for w, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        shards, _ = dataset.locate(order.samples(lo, hi - lo)[0])
        last = plan.window_blocks[w + 1] if w + 1 < len(plan.window_blocks) else len(plan.blocks)
        window_shards = set(plan.blocks[plan.window_blocks[w] : last].tolist())
        assert set(shards.tolist()) == window_shards  # reads stay within the window's shards
        assert hi - lo >= 12 or w == len(bounds) - 2  # each window but the last holds >= 12


def test_the_stream_is_the_same_for_any_ranks_micro_batch_and_workers(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    base = keys_only(str(tmp_path))
    reference = keys_by_position(replace(base, batch_size=6), 1, 10)  # 60 positions
    for world, batch, workers in ((2, 3, 0), (3, 2, 0), (2, 5, 2), (1, 4, 1)):
        cfg = replace(base, batch_size=batch, num_workers=workers)
        got = keys_by_position(cfg, world, 60 // (world * batch))
        assert got == {p: k for p, k in reference.items() if p in got}, (world, batch, workers)
        assert len(got) == 60 // (world * batch) * world * batch


def test_carry_completes_an_epochs_last_global_batch_with_the_next_epoch(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    cfg = keys_only(str(tmp_path), batch_size=6)
    batches = list(islice(iter(build_loader(cfg, 0, 1)), 7))
    first_epoch = [k for b in batches for k in b.keys][:40]
    assert len(set(first_epoch)) == 40  # every sample of epoch 0 exactly once
    straddling = batches[6]  # positions 36..41: four of epoch 0, two of epoch 1
    assert straddling.position == 36 and straddling.epoch == 0
    order = GlobalOrder(resolve_dataset(cfg.shards, False), cfg)
    assert order.samples(36, 6)[1].tolist() == [0, 0, 0, 0, 1, 1]


def test_drop_cuts_each_epoch_to_whole_global_batches(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    cfg = keys_only(str(tmp_path), batch_size=6, epoch_tail="drop")
    loader = build_loader(cfg, 0, 1)
    batches = list(islice(iter(loader), 7))
    assert [b.epoch for b in batches] == [0] * 6 + [1]  # 40 samples: 6 global batches of 6
    assert len({k for b in batches[:6] for k in b.keys}) == 36  # 4 unseen, none twice
    with pytest.raises(LoaderConfigError, match="epoch_tail=carry"):
        build_loader(replace(cfg, batch_size=41), 0, 1)


def test_resampled_epochs_are_the_data_size_and_draw_shards_with_replacement(tmp_path):
    write_dataset(tmp_path / "a", [20, 20], name="a")
    write_dataset(tmp_path / "b", [5, 5, 5], name="b")
    cfg = keys_only(f"a={tmp_path / 'a'}:1,b={tmp_path / 'b'}:3", resampled=True)
    dataset = resolve_dataset(cfg.shards, True)
    plan = plan_epoch(dataset, cfg, 0)
    assert plan.length == dataset.total_samples == 55
    assert len(plan.blocks) > len(set(plan.blocks.tolist()))  # a shard drawn more than once
    assert plan_epoch(dataset, cfg, 0).blocks.tolist() == plan.blocks.tolist()  # seeded


# ------------------------------------------------------------------ tar indexes and reading


def test_a_tar_index_finds_every_sample_and_its_members(tmp_path):
    keys = write_dataset(tmp_path, [5])
    shard = tmp_path / "data-000000.tar"
    index = index_of_file(str(shard))
    assert list(index.keys) == keys and index.bytes == shard.stat().st_size
    data = shard.read_bytes()
    for key, offset, length in zip(index.keys, index.offsets, index.lengths):
        members = split_members(data[offset : offset + length])
        assert set(members) == {"jpg", "txt", "json"}
        assert json.loads(members["json"])["key"] == key
    write_index(index, index_location(str(shard)))
    assert load_index(str(shard)) == index and check_index(str(shard)) == []


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_member_names_and_folders_in_names_are_indexed(tmp_path, fmt):
    # Past ustar's 100 bytes: a pax or GNU extension header, or ustar's prefix field.
    long_key = "sub/" + "d" * 120 + "/" + ("k" * 90 if fmt == tarfile.USTAR_FORMAT else "k" * 150)
    members = sample_members(long_key, 0, "img", ["a long one"]) + sample_members(
        "sub/dir/short", 1, "img2", ["short"]
    )
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            add_member(tar, name, data)
    index = index_of_file(str(path))
    assert list(index.keys) == [long_key, "sub/dir/short"]
    reader = ShardReader((resolve_dataset(str(path), False).shards[0],))
    for i, (key, (_, image)) in enumerate(((long_key, members[0]), ("sub/dir/short", members[3]))):
        sample = reader.read(0, i, Counter())
        assert sample.key == key and sample.image == image
        raw = path.read_bytes()[index.offsets[i] : index.offsets[i] + index.lengths[i]]
        assert split_members(raw) == _split_with_tarfile(raw)  # the fast parser agrees


def test_a_sample_whose_members_are_not_together_is_refused(tmp_path):
    a, b = sample_members("a", 0, "a", ["x"]), sample_members("b", 1, "b", ["y"])
    write_tar(tmp_path / "mixed.tar", [a[0], b[0], a[1]])
    with pytest.raises(TarIndexError, match="not consecutive"):
        index_of_file(str(tmp_path / "mixed.tar"))


def test_a_stale_index_is_reported_and_the_tar_read_instead(tmp_path):
    write_dataset(tmp_path, [4])
    shard = str(tmp_path / "data-000000.tar")
    write_index(index_of_file(shard), index_location(shard))
    with open(shard, "ab") as handle:
        handle.write(b"\0" * 512)  # another copy of the shard, other size
    assert "rebuild the index" in check_index(shard)[0]
    assert len(load_index(shard)) == 4  # read from the tar itself


def test_a_truncated_tar_loses_only_the_samples_it_cut(tmp_path):
    keys = write_dataset(tmp_path, [5])
    truncate_inside(tmp_path / "data-000000.tar", f"{keys[3]}.jpg")
    reader = ShardReader(resolve_dataset(str(tmp_path), False).shards)
    errors: Counter = Counter()
    got = [reader.read(0, i, errors) for i in range(5)]
    assert [s.key for s in got[:3]] == keys[:3] and got[3:] == [None, None]
    assert errors == {"truncated_tar": 2}
    streamed = [s.key for s in read_tar_samples(reader.shards[0], Counter())]
    assert streamed == keys[:3]


def test_shards_read_in_turn_stay_open_however_many_the_windows_span(tmp_path, monkeypatch):
    """A mixture's windows (one per source) or a window over many small shards has the reader
    cycle over more shards than it keeps open at first: each was closed and opened again (its
    index read or scanned anew, ~13 ms) for almost every sample (375 opens in a 512-sample epoch
    of 3 sources from S3, 13 with this). A shard needed again soon after it made room keeps one
    more open, so the cycle settles."""
    import data_pipeline.loader.reader as reader_module

    keys = write_dataset(tmp_path, [6] * 8)
    opened = []
    real_open = reader_module._OpenShard.open.__func__

    def counting_open(cls, shard, cache, known=None, ahead=None):
        opened.append(shard.path)
        return real_open(cls, shard, cache, known, ahead)

    monkeypatch.setattr(reader_module._OpenShard, "open", classmethod(counting_open))
    reader = ShardReader(resolve_dataset(str(tmp_path), False).shards, keep_open=3)
    errors: Counter = Counter()
    got = [reader.read(i % 8, i // 8, errors).key for i in range(48)]  # shard by shard, in turn
    assert got == [keys[(i % 8) * 6 + i // 8] for i in range(48)] and not errors
    assert len(opened) <= 8 + 5 and reader.keep_open == 8  # it had been 48 opens
    assert len(reader._open) == 8


def test_a_copys_index_is_built_once_per_node_and_kept_beside_it(tmp_path, monkeypatch):
    """Every worker of every rank opens each shard of its windows: each scanned the copy's tar
    headers (1.4 s of CPU for 10,000 samples). The first keeps the index beside the copy, the
    others read it (~5 ms); an index of another copy is not taken; eviction removes both. (A
    shard with an index file in the store gives its copy that one: tests/.../test_storage.py.)"""
    import shutil

    import data_pipeline.loader.reader as reader_module
    from data_pipeline.loader.reader import copy_index
    from data_pipeline.shard_cache import ShardCache
    from tests.storage_servers import moto_s3

    write_dataset(tmp_path / "src", [5])
    cache = ShardCache(tmp_path / "cache")
    scans = []
    real_scan = reader_module.index_of_file
    monkeypatch.setattr(reader_module, "index_of_file", lambda *a: scans.append(a) or real_scan(*a))
    with moto_s3() as server:  # the shard in the store has no index file
        url = server.upload_folder(tmp_path / "src", "ds") + "/data-000000.tar"
        copy = cache.path_for(url)
        copy.parent.mkdir(parents=True)
        shutil.copy(tmp_path / "src" / "data-000000.tar", copy)  # as a download leaves it
        held = cache.acquire(url)
        first = copy_index(url, held)
        assert first == real_scan(url, str(copy)) and len(scans) == 1
        assert copy_index(url, held) == first and len(scans) == 1  # another process: no scan
        assert held.index_path.is_file() and cache._copies() == [copy]
        other = first.to_json() | {"bytes": first.bytes + 512}  # made for a copy of another size
        held.index_path.write_text(json.dumps(other))
        assert copy_index(url, held) == first and len(scans) == 2
    held.release()
    half = held.index_path.with_name(held.index_path.name + "x1y2.tmp")  # its writer was killed
    half.write_text("{")
    cache.limit_bytes = 0
    cache.evict()
    assert not copy.exists() and not held.index_path.exists() and not half.exists()


def test_local_shards_without_index_files_are_named_once_with_the_command_that_indexes_them(
    tmp_path, caplog
):
    """Without index files every worker of every rank scans each shard's tar headers when it
    opens it (1.4 s of CPU per 10,000 samples): rank 0 says so once, with the command to run;
    the command's indexes end the warning."""
    write_dataset(tmp_path, [5, 6])
    cfg = keys_only(str(tmp_path))
    with caplog.at_level("WARNING", logger="umt.data"):
        build_loader(cfg, 1, 2)  # not rank 0: silent
        assert "no index file" not in caplog.text
        build_loader(cfg, 0, 2)
    assert (
        f"2 of the first 2 local shards have no index file ({tmp_path}/data-000000.tar)"
        in caplog.text
    )
    assert f"`umt data index {tmp_path}` writes the indexes once" in caplog.text
    caplog.clear()
    for tar in sorted(tmp_path.glob("*.tar")):
        write_index(index_of_file(str(tar)), index_location(str(tar)))
    with caplog.at_level("WARNING", logger="umt.data"):
        build_loader(cfg, 0, 2)
    assert "no index file" not in caplog.text


def test_fill_slots_takes_the_next_decoded_sample_cyclically():
    assert fill_slots(["a", None, "c", None]) == ["a", "c", "c", "a"]


def test_a_worker_makes_its_batch_pixels_in_shared_memory(monkeypatch):
    """Inside a DataLoader worker the batch is stacked straight into shared memory (the main
    process maps it: no copy on the way); in the training process, in ordinary memory."""
    import data_pipeline.loader.batch as batch_module

    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    samples = [
        DecodedSample(RawSample(f"k{i}", f"k{i}", b"", "a caption", ("a caption",)), "a caption", p)
        for i, p in enumerate(pixels)
    ]
    cfg = LoaderConfig(shards="unused", batch_size=2)
    here = collate_batch(samples, cfg, tokenizer=None)
    monkeypatch.setattr(batch_module.torch.utils.data, "get_worker_info", lambda: object())
    in_worker = collate_batch(samples, cfg, tokenizer=None)
    assert not here.pixel_values.is_shared() and in_worker.pixel_values.is_shared()
    want = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    assert torch.equal(here.pixel_values, want) and torch.equal(in_worker.pixel_values, want)
    assert fill_slots([None, None]) is None


def test_bad_samples_are_counted_recorded_and_replaced_in_process(tmp_path):
    valid, bad = write_dirty_dataset(tmp_path, [6, 6, 6, 6, 6])
    cfg = keys_only(str(tmp_path), decode_images=True, batch_size=5)
    loader = build_loader(cfg, 0, 1)
    batches = list(islice(iter(loader), 6))  # 30 positions: epoch 0 exactly
    assert Counter(loader.error_counts()) == Counter(bad.values())
    failures = [f for b in batches for f in b.failures]
    assert len(failures) == len(
        bad
    )  # each recorded with its reason (and key, where the tar has it)
    unindexed = {"dirty-003-0004", "dirty-003-0005"}  # cut off the tar with their headers
    assert {f["key"]: f["reason"] for f in failures if f["key"]} == {
        k: v for k, v in bad.items() if k not in unindexed
    }
    assert {(f["index"], f["reason"]) for f in failures if not f["key"]} == {
        (4, "truncated_tar"),
        (5, "truncated_tar"),
    }
    used = [k for b in batches for k in b.keys]
    assert set(used) == set(valid)  # every usable sample of the epoch, fillers repeat some
    assert len(used) == 30 and all(len(b) == 5 for b in batches)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_batch_with_no_readable_sample_fails_in_one_line_naming_the_shards(tmp_path, workers):
    keys = write_dataset(tmp_path, [4], name="corrupt")
    path = tmp_path / "data-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    write_tar(path, [(n, b"not an image" if n.endswith(".jpg") else d) for n, d in members])
    cfg = keys_only(str(tmp_path), decode_images=True, batch_size=2, num_workers=workers)
    with pytest.raises(LoaderDataError) as caught:
        next(iter(build_loader(cfg, 0, 1)))
    message = str(caught.value)
    assert "\n" not in message and "data-000000.tar" in message and "corrupt_image" in message
    assert len(keys) == 4


def test_random_caption_is_one_of_the_image_captions_and_seeded(tmp_path):
    write_dataset(tmp_path, [5], captions_per_image=5)
    cfg = keys_only(str(tmp_path), decode_images=True, caption="random", batch_size=5)
    picks = [next(iter(build_loader(cfg, 0, 1))).captions for _ in range(2)]
    assert picks[0] == picks[1]
    assert all(c.startswith("caption ") and c.endswith(" of ds") for c in picks[0])
    assert len(set(picks[0])) > 1  # not always the .txt one


def test_batch_holds_uint8_pixels_hashed_keys_and_tokens(tmp_path, minilm_dir):
    from umt.objectives import key_ids

    write_dataset(tmp_path, [4, 4])
    cfg = keys_only(str(tmp_path), decode_images=True, tokenizer=minilm_dir, image_size=16)
    batch = next(iter(build_loader(cfg, 0, 1)))
    # uint8 through the worker queue and the host-to-device copy; normalised on the device.
    assert batch.pixel_values.shape == (3, 3, 16, 16) and batch.pixel_values.dtype == torch.uint8
    pixels = batch.normalized_pixels(torch.device("cpu"), torch.bfloat16)
    assert pixels.dtype == torch.bfloat16
    want = (batch.pixel_values.float() / 255 - 0.5) / 0.5
    assert torch.allclose(
        batch.normalized_pixels(torch.device("cpu"), torch.float32), want, atol=1e-6
    )
    assert torch.equal(batch.image_ids, key_ids(batch.image_keys))  # hashed in the worker
    assert (
        batch.input_ids.dtype == torch.long and batch.input_ids.shape == batch.attention_mask.shape
    )
    assert batch.input_ids[:, 0].eq(101).all()  # [CLS]
    assert batch.to("cpu").keys == batch.keys and isinstance(batch.to("cpu"), Batch)


# ------------------------------------------------------------------ state


def test_state_is_a_json_position_that_resumes_on_another_topology(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    cfg = keys_only(str(tmp_path))
    reference = keys_by_position(replace(cfg, batch_size=6), 1, 6)
    loaders = [build_loader(cfg, r, 2) for r in range(2)]
    for loader in loaders:
        list(islice(iter(loader), 3))  # 3 rounds of 2 x 3
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    assert states[0] == states[1] and states[0]["position"] == 18
    again = [build_loader(replace(cfg, batch_size=2), r, 3) for r in range(3)]
    resumed = {}
    for loader in again:
        loader.load_state_dict(states[0])
        for batch in islice(iter(loader), 3):  # 3 rounds of 3 x 2 = positions 18..35
            resumed |= {batch.position + j: k for j, k in enumerate(batch.keys)}
    assert sorted(resumed) == list(range(18, 36))
    assert resumed == {p: reference[p] for p in range(18, 36)}


def test_resume_with_another_seed_data_window_or_tail_is_refused(tmp_path):
    write_dataset(tmp_path / "a", CLEAN_COUNTS)
    write_dataset(tmp_path / "b", [3, 3])
    cfg = keys_only(str(tmp_path / "a"))
    state = build_loader(cfg, 0, 1).state_dict()
    for change, key in (
        ({"seed": 8}, "seed"),
        ({"shards": str(tmp_path / "b")}, "data_digest"),
        ({"shuffle_window": 5}, "shuffle_window"),
        ({"epoch_tail": "drop"}, "epoch_tail"),
    ):
        with pytest.raises(LoaderStateError, match=key):
            build_loader(replace(cfg, **change), 0, 1).load_state_dict(state)


def test_a_state_of_the_old_per_rank_loader_continues_at_the_next_epoch(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    loader = build_loader(keys_only(str(tmp_path)), 0, 1)
    loader.load_state_dict({"format_version": 1, "epoch": 2, "batches_in_epoch": 3})
    assert loader.position == 3 * 40 and loader.epoch == 3


def test_negatives_field_gives_one_seeded_negative_caption_per_sample(tmp_path):
    """Demo scenes sharded with their `negatives` column: each batch row carries one of them."""
    from data_pipeline.builtin import write_split, write_tokenizer
    from data_pipeline.shard import ShardOptions, shard_dataset

    table = write_split(tmp_path / "data", "train", 12, 32)
    options = ShardOptions(
        image_col="image", caption_col="captions", resize="none", maxcount=6,
        save_additional_columns=("negatives",),
    )  # fmt: skip
    shard_dataset(table, tmp_path / "shards", options)
    tokenizer = str(write_tokenizer(tmp_path / "tokenizer"))
    rows = {f"images/train-{i:06d}.png": json.loads(line) for i, line in enumerate(table.open())}
    cfg = keys_only(
        str(tmp_path / "shards"), decode_images=True, tokenizer=tokenizer, image_size=32,
        batch_size=4, negatives="negatives",
    )  # fmt: skip
    from transformers import AutoTokenizer

    decode = AutoTokenizer.from_pretrained(tokenizer).decode
    drawn = []
    for batch in islice(iter(build_loader(cfg, 0, 1)), 3):
        assert batch.negative_valid.all() and batch.negative_input_ids.shape[0] == len(batch)
        for ids, mask, key in zip(
            batch.negative_input_ids, batch.negative_attention_mask, batch.image_keys
        ):
            text = decode(ids[mask.bool()], skip_special_tokens=True)
            assert text in rows[key]["negatives"], (text, rows[key])
            drawn.append(text)
    assert len(set(drawn)) > 1


# ------------------------------------------------------------------ multi-rank contracts


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, minilm_dir):
    """Run _loader_ranks.py once under torchrun (2 ranks x 2 workers); {scenario: [rank0, rank1]}."""
    root = tmp_path_factory.mktemp("loader_ranks")
    write_dataset(root / "clean", CLEAN_COUNTS, name="clean")
    valid, bad = write_dirty_dataset(root / "dirty", [6, 6, 6, 6, 6])
    write_dataset(root / "mix_a", [20, 20], name="a")
    write_dataset(root / "mix_b", [5, 5, 5], name="b")
    (root / "out").mkdir()
    run_torchrun(
        Path(__file__).parent / "_loader_ranks.py",
        *("--out", str(root / "out"), "--clean", str(root / "clean")),
        *("--dirty", str(root / "dirty"), "--tokenizer", minilm_dir),
        *("--mix-a", str(root / "mix_a"), "--mix-b", str(root / "mix_b")),
        timeout_s=300,
    )
    results = {}
    for path in sorted((root / "out").glob("*-rank*.json")):
        scenario, rank = path.stem.rsplit("-rank", 1)
        results.setdefault(scenario, [None, None])[int(rank)] = json.loads(path.read_text())
    results["root"], results["dirty_valid"], results["dirty_bad"] = root, valid, bad
    return results


def by_position(results: list[dict]) -> dict[int, str]:
    out = {}
    for result in results:
        for b in result["batches"]:
            for j, key in enumerate(b["keys"]):
                assert b["position"] + j not in out
                out[b["position"] + j] = key
    return out


@pytest.mark.slow
def test_two_ranks_of_two_workers_see_every_sample_of_an_epoch_exactly_once(ranks):
    for result in ranks["carry"]:
        assert [b["round"] for b in result["batches"]] == list(range(14))
    stream = by_position(ranks["carry"])
    assert sorted(stream) == list(range(84))  # 14 rounds of 2 ranks x 3
    epoch0 = [stream[p] for p in range(40)]
    assert len(set(epoch0)) == 40  # every sample once, including the last partial global batch
    assert sorted(stream[p] for p in range(40, 80)) == sorted(epoch0)  # epoch 1: all again
    drop = by_position(ranks["drop"])
    assert len({drop[p] for p in range(36)}) == 36  # drop: 4 unseen in epoch 0, none twice


@pytest.mark.slow
def test_two_ranks_yield_the_stream_one_rank_does(ranks):
    cfg = keys_only(str(ranks["root"] / "clean"), batch_size=6)
    one_rank = keys_by_position(cfg, 1, 14)
    assert by_position(ranks["carry"]) == one_rank


@pytest.mark.slow
def test_batches_from_workers_hold_pixels_and_tokens(ranks):
    for batch in ranks["carry"][0]["batches"]:
        assert batch["pixels"] == [3, 3, 8, 8] and batch["ids"][0] == 3
        assert 0 <= batch["pixel_range"][0] <= batch["pixel_range"][1] <= 255  # uint8


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["resume_clean", "resume_dirty", "resume_resampled"])
def test_resume_after_batch_k_equals_uninterrupted(ranks, scenario):
    def content(batches):  # `round` counts from each loader's start
        return [{k: v for k, v in b.items() if k != "round"} for b in batches]

    for result in ranks[scenario]:
        assert content(result["resumed"]) == content(result["uninterrupted"])
    assert ranks[scenario][0]["state"] == ranks[scenario][1]["state"]  # the same on every rank


@pytest.mark.slow
def test_bad_samples_are_counted_and_replaced_across_ranks(ranks):
    valid, bad = ranks["dirty_valid"], ranks["dirty_bad"]
    errors: Counter = Counter()
    for result in ranks["dirty"]:
        errors.update(result["errors"])
    assert Counter({r: n for r, n in errors.items()}) == Counter(bad.values())  # epoch 0 only
    stream = by_position(ranks["dirty"])  # 5 rounds of 6: epoch 0
    assert {stream[p] for p in range(30)} == set(valid)
    failures = [f for r in ranks["dirty"] for b in r["batches"] for f in b["failures"]]
    named = {f["key"]: f["reason"] for f in failures if f["key"]}
    assert {k: v for k, v in bad.items() if k in named} == named and len(named) == len(bad) - 2


@pytest.mark.slow
def test_mixing_weights_hold_within_tolerance(ranks):
    keys = [k for result in ranks["mixed"] for b in result["batches"] for k in b["keys"]]
    share_b = sum(k.startswith("b/b-") for k in keys) / len(keys)  # keys are source/key
    # weight 3 of 4, per sample, though b's shards are 4x smaller: 3200 samples, shard-sized
    # blocks, so the share varies more than per-sample draws would
    assert abs(share_b - 0.75) < 0.06
    assert len(set(keys)) == 55  # every sample of both sources drawn at some point


@pytest.mark.slow
def test_order_cli_prints_what_each_rank_yielded_in_another_interpreter(ranks):
    root = ranks["root"]
    for rank, result in enumerate(ranks["carry"]):
        cmd = [sys.executable, "-m", "launch.cli", "data", "order", str(root / "clean")]
        cmd += ["--rank", str(rank), "--world-size", "2", "--workers", "2", "--batch-size", "3"]
        cmd += ["--seed", "7", "--shuffle-window", "12", "--sample-keys", "--steps", "14"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": str(100 + rank)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        printed = [line.split("\t")[2].split() for line in proc.stdout.splitlines()]
        assert printed == [b["keys"] for b in result["batches"]]
