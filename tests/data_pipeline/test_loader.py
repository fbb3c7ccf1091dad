"""Tests of data_pipeline/loader.py: shard specs, the epoch plan, error handling, state, and the
multi-rank contracts (coverage, equal batch counts, resume, order, mixing) under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch

from data_pipeline.loader import (
    Batch,
    LoaderConfig,
    LoaderConfigError,
    LoaderStateError,
    Shard,
    build_loader,
    expand_braces,
    parse_source_specs,
    permute_shards,
    plan_epoch,
    read_tar_samples,
    resolve_sources,
    shuffle_samples,
    split_shards,
)
from tests.conftest import REPO, run_torchrun
from tests.data_pipeline.loader_fixtures import (
    truncate_inside,
    write_dataset,
    write_dirty_dataset,
)

CLEAN_COUNTS = [7, 5, 6, 4, 3, 7, 2, 6]  # 40 samples, unequal shards
# Largest-first into 4 slots (2 ranks x 2 workers) gives shares 10, 9, 11, 10:
PAD_BATCHES_PER_RANK = 2 * 4  # ceil(11 / 3) per worker
DROP_BATCHES_PER_RANK = 2 * 3  # floor(9 / 3) per worker


def keys_only(shards: str, **overrides) -> LoaderConfig:
    base = dict(
        shards=shards,
        batch_size=3,
        num_workers=0,
        seed=7,
        shuffle_buffer=4,
        tokenizer=None,
        decode_images=False,
    )
    return LoaderConfig(**{**base, **overrides})


# ------------------------------------------------------------------ shard specs and counts


def test_expand_braces_ranges_and_lists():
    assert expand_braces("/d/x-{000..002}.tar") == ["/d/x-000.tar", "/d/x-001.tar", "/d/x-002.tar"]
    assert expand_braces("/d/{a,b}-{0..1}.tar") == [
        "/d/a-0.tar",
        "/d/a-1.tar",
        "/d/b-0.tar",
        "/d/b-1.tar",
    ]
    assert expand_braces("/d/plain.tar") == ["/d/plain.tar"]


def test_source_specs_take_names_weights_and_braces_with_commas():
    specs = parse_source_specs("coco=/d/coco:1,cc3m=/d/cc3m-{a,b}.tar:4.5,/d/other")
    assert [(s.name, s.location, s.weight) for s in specs] == [
        ("coco", "/d/coco", 1.0),
        ("cc3m", "/d/cc3m-{a,b}.tar", 4.5),
        (None, "/d/other", None),
    ]
    assert parse_source_specs(["/d/a", "/d/b:2"])[1].weight == 2.0


def test_weights_need_resampled_mode(tmp_path):
    write_dataset(tmp_path / "a", [2, 2])
    with pytest.raises(LoaderConfigError, match="resampled"):
        resolve_sources(f"{tmp_path / 'a'}:3", resampled=False)


def test_folder_without_manifest_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, [2, 2], manifest=False)
    with pytest.raises(LoaderConfigError, match="no manifest.json"):
        resolve_sources(str(tmp_path), resampled=False)


def test_pattern_without_manifest_counts_by_reading(tmp_path):
    write_dataset(tmp_path, [3, 5], manifest=False)
    (source,) = resolve_sources(str(tmp_path / "data-{000000..000001}.tar"), resampled=False)
    assert [s.count for s in source.shards] == [3, 5]


def test_pattern_uses_manifest_counts_beside_it(tmp_path):
    write_dataset(tmp_path, [3, 5])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["count"] = 99  # proves the count is read, not counted
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (source,) = resolve_sources(str(tmp_path / "data-{000000..000001}.tar"), resampled=False)
    assert [s.count for s in source.shards] == [3, 99]


def test_manifest_of_unknown_format_version_is_refused(tmp_path):
    write_dataset(tmp_path, [2])
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 9, "shards": []}))
    with pytest.raises(LoaderConfigError, match="format_version 9"):
        resolve_sources(str(tmp_path), resampled=False)


def test_missing_shard_file_is_named(tmp_path):
    with pytest.raises(LoaderConfigError, match="do not exist"):
        resolve_sources(str(tmp_path / "x-{0..1}.tar"), resampled=False)


# ------------------------------------------------------------------ the epoch plan


def test_split_is_disjoint_covering_and_balanced():
    shards = [Shard(f"s{i}", c) for i, c in enumerate([9, 3, 7, 7, 1, 5, 8, 2, 6, 4, 9])]
    for epoch in range(5):
        groups = split_shards(permute_shards(shards, 0, epoch), 4, 0, epoch)
        flat = [s.path for g in groups for s in g]
        assert sorted(flat) == sorted(s.path for s in shards)
        totals = [sum(s.count for s in g) for g in groups]
        assert max(totals) - min(totals) <= max(s.count for s in shards)


def test_batches_per_epoch_is_the_same_every_epoch(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    sources = resolve_sources(str(tmp_path), resampled=False)
    cfg = keys_only(str(tmp_path), num_workers=2)
    per_worker = {plan_epoch(sources, cfg, 2, epoch).batches_per_worker for epoch in range(20)}
    assert per_worker == {PAD_BATCHES_PER_RANK // 2}


def test_shard_order_changes_between_epochs_but_not_between_calls():
    shards = [Shard(f"s{i}", 1) for i in range(20)]
    assert permute_shards(shards, 3, 0) == permute_shards(shards, 3, 0)
    assert permute_shards(shards, 3, 0) != permute_shards(shards, 3, 1)


def test_fewer_shards_than_ranks_times_workers_suggests_resampled(tmp_path):
    write_dataset(tmp_path, [4, 4, 4])
    with pytest.raises(LoaderConfigError, match="resampled") as exc:
        build_loader(keys_only(str(tmp_path), num_workers=2), rank=0, world_size=2)
    assert "2 x 2 = 4 shards" in str(exc.value) and "has 3" in str(exc.value)
    build_loader(keys_only(str(tmp_path), num_workers=2, resampled=True), rank=0, world_size=2)


def test_drop_without_a_full_batch_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, [2, 2])
    with pytest.raises(LoaderConfigError, match="on_uneven='drop' leaves no full batch"):
        build_loader(keys_only(str(tmp_path), on_uneven="drop", batch_size=5), 0, 1)


def test_bad_config_values_name_the_field():
    with pytest.raises(LoaderConfigError, match="data.batch_size must be > 0"):
        LoaderConfig(shards="/x", batch_size=0).validate()
    with pytest.raises(LoaderConfigError, match="data.on_uneven"):
        LoaderConfig(shards="/x", on_uneven="repeat").validate()


# ------------------------------------------------------------------ reading and shuffling


def test_shuffle_buffer_permutes_and_is_seeded():
    import random

    a = list(shuffle_samples(range(50), 8, random.Random("s")))
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert a == list(shuffle_samples(range(50), 8, random.Random("s")))


def test_truncated_tar_ends_its_shard_and_the_stream_goes_on(tmp_path):
    write_dataset(tmp_path, [6, 4])
    truncate_inside(tmp_path / "data-000000.tar", "ds-000-0003.jpg")
    errors = Counter()
    keys = [
        s.key
        for path, count in ((tmp_path / "data-000000.tar", 6), (tmp_path / "data-000001.tar", 4))
        for s in read_tar_samples(Shard(str(path), count), errors)
    ]
    assert keys == [f"ds-000-{i:04d}" for i in range(3)] + [f"ds-001-{i:04d}" for i in range(4)]
    assert errors == {"truncated_tar": 1}


def test_corrupt_members_are_counted_and_skipped_in_process(tmp_path):
    valid, bad = write_dirty_dataset(tmp_path, [6, 6, 6, 6])
    cfg = keys_only(str(tmp_path), decode_images=True, image_size=8, shuffle_buffer=0)
    loader = build_loader(cfg, 0, 1)
    seen = [k for batch in islice(loader, loader.batches_per_epoch) for k in batch.keys]
    assert set(seen) == set(valid)  # a short stream repeats itself to fill the epoch
    assert not set(seen) & set(bad)
    assert set(loader.error_counts()) == set(bad.values())


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


def test_state_dict_is_plain_json_and_resumes_in_process(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    cfg = keys_only(str(tmp_path), num_workers=0)
    full = [b.keys for b in islice(build_loader(cfg, 1, 2), 20)]
    first = build_loader(cfg, 1, 2)
    head = [b.keys for b in islice(first, 7)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches_in_epoch"] + state["epoch"] * first.batches_per_epoch == 7
    second = build_loader(cfg, 1, 2)
    second.load_state_dict(state)
    assert head + [b.keys for b in islice(second, 13)] == full


def test_resume_on_another_topology_is_refused_naming_both(tmp_path):
    write_dataset(tmp_path, CLEAN_COUNTS)
    state = build_loader(keys_only(str(tmp_path), num_workers=2), 0, 2).state_dict()
    other = build_loader(keys_only(str(tmp_path), num_workers=1), 0, 4)
    with pytest.raises(LoaderStateError) as exc:
        other.load_state_dict(state)
    message = str(exc.value)
    assert "world_size=2, num_workers=2" in message and "world_size=4, num_workers=1" in message


def test_resume_with_other_seed_or_data_is_refused(tmp_path):
    write_dataset(tmp_path / "a", CLEAN_COUNTS)
    write_dataset(tmp_path / "b", CLEAN_COUNTS[:-1])
    state = build_loader(keys_only(str(tmp_path / "a")), 0, 1).state_dict()
    with pytest.raises(LoaderStateError, match="seed"):
        build_loader(keys_only(str(tmp_path / "a"), seed=8), 0, 1).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="data_digest"):
        build_loader(keys_only(str(tmp_path / "b")), 0, 1).load_state_dict(state)


# ------------------------------------------------------------------ multi-rank contracts


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, minilm_dir):
    """Run _loader_ranks.py once under torchrun (2 ranks x 2 workers); {scenario: [rank0, rank1]}."""
    root = tmp_path_factory.mktemp("loader_ranks")
    write_dataset(root / "clean", CLEAN_COUNTS, name="clean")
    write_dataset(root / "even", [6] * 8, name="even")
    valid, bad = write_dirty_dataset(root / "dirty", [6, 6, 6, 6, 6])
    write_dataset(root / "mix_a", [20, 20], name="a")
    write_dataset(root / "mix_b", [5, 5, 5], name="b")
    (root / "out").mkdir()
    run_torchrun(
        Path(__file__).parent / "_loader_ranks.py",
        *(
            "--out",
            str(root / "out"),
            "--clean",
            str(root / "clean"),
            "--uniform",
            str(root / "even"),
        ),
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


def epoch_keys(result: dict, epoch: int) -> list[str]:
    return [k for b in result["batches"] if b["epoch"] == epoch for k in b["keys"]]


@pytest.mark.slow
def test_ranks_yield_equal_batch_counts_with_unequal_shards(ranks):
    for scenario, expected in (("pad", PAD_BATCHES_PER_RANK), ("drop", DROP_BATCHES_PER_RANK)):
        for result in ranks[scenario]:
            assert result["batches_per_epoch"] == expected
            for epoch in (0, 1):
                indices = [b["index"] for b in result["batches"] if b["epoch"] == epoch]
                assert indices == list(range(expected))


@pytest.mark.slow
def test_epoch_covers_every_sample_exactly_once_across_ranks_and_workers(ranks):
    all_keys = {f"even-{s:03d}-{i:04d}" for s in range(8) for i in range(6)}
    for epoch in (0, 1):
        seen = [k for result in ranks["even"] for k in epoch_keys(result, epoch)]
        assert sorted(seen) == sorted(all_keys)  # 48 samples, 2 ranks x 2 workers x 4 x 3


@pytest.mark.slow
def test_pad_epoch_covers_every_sample_and_repeats_only_to_equalize(ranks):
    all_keys = {f"clean-{s:03d}-{i:04d}" for s, n in enumerate(CLEAN_COUNTS) for i in range(n)}
    for epoch in (0, 1):
        seen = Counter(k for result in ranks["pad"] for k in epoch_keys(result, epoch))
        assert set(seen) == all_keys
        assert sum(seen.values()) == 2 * PAD_BATCHES_PER_RANK * 3  # 48 slots for 40 samples
        assert sum(n - 1 for n in seen.values()) == 48 - 40


@pytest.mark.slow
def test_drop_epoch_sees_no_sample_twice(ranks):
    for epoch in (0, 1):
        seen = [k for result in ranks["drop"] for k in epoch_keys(result, epoch)]
        assert len(seen) == len(set(seen)) == 2 * DROP_BATCHES_PER_RANK * 3


@pytest.mark.slow
def test_order_changes_between_epochs_with_persistent_and_fresh_workers(ranks):
    for scenario in ("pad", "drop"):  # pad keeps its workers, drop starts new ones each epoch
        for result in ranks[scenario]:
            assert epoch_keys(result, 0) != epoch_keys(result, 1)


@pytest.mark.slow
def test_batches_from_workers_hold_pixels_and_tokens(ranks):
    for batch in ranks["pad"][0]["batches"]:
        assert batch["pixels"] == [3, 3, 8, 8] and batch["ids"][0] == 3
        assert 0 <= batch["pixel_range"][0] <= batch["pixel_range"][1] <= 255  # uint8


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["resume_clean", "resume_dirty", "resume_resampled"])
def test_resume_after_batch_k_equals_uninterrupted(ranks, scenario):
    for result in ranks[scenario]:
        assert result["resumed"] == result["uninterrupted"]
        assert len({b["epoch"] for b in result["resumed"]}) >= 2  # crossed an epoch boundary


@pytest.mark.slow
def test_corrupt_members_are_counted_and_skipped_across_ranks(ranks):
    valid, bad = ranks["dirty_valid"], ranks["dirty_bad"]
    errors = Counter()
    for result in ranks["dirty"]:
        errors.update(result["errors"])
    assert set(errors) == set(bad.values())
    for epoch in (0, 1):
        seen = {k for result in ranks["dirty"] for k in epoch_keys(result, epoch)}
        assert seen == set(valid)
    counts = {len(result["batches"]) for result in ranks["dirty"]}
    assert len(counts) == 1


@pytest.mark.slow
def test_mixing_weights_hold_within_tolerance(ranks):
    keys = [k for result in ranks["mixed"] for b in result["batches"] for k in b["keys"]]
    share_b = sum(k.startswith("b-") for k in keys) / len(keys)
    # weight 3 of 4, per sample, though b's shards are 4x smaller; 3200 draws: sigma ~0.008
    assert abs(share_b - 0.75) < 0.04
    assert len(set(keys)) == 55  # every sample of both sources drawn at some point


@pytest.mark.slow
def test_order_cli_prints_what_each_rank_yielded_in_another_interpreter(ranks):
    root = ranks["root"]
    for rank, result in enumerate(ranks["pad"]):
        cmd = [sys.executable, "-m", "launch.cli", "data", "order", str(root / "clean")]
        cmd += ["--rank", str(rank), "--world-size", "2", "--workers", "2", "--batch-size", "3"]
        cmd += ["--seed", "7", "--shuffle-buffer", "4", "--sample-keys"]
        cmd += ["--batches", str(2 * PAD_BATCHES_PER_RANK)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": str(100 + rank)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        printed = [line.split("\t")[2].split() for line in proc.stdout.splitlines()]
        assert printed == [b["keys"] for b in result["batches"]]


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
    again = next(iter(build_loader(cfg, 0, 1)))
    assert torch.equal(
        again.negative_input_ids, next(iter(build_loader(cfg, 0, 1))).negative_input_ids
    )
    # Without the option there is nothing extra; without the field a row is marked invalid.
    assert next(iter(build_loader(replace(cfg, negatives=None), 0, 1))).negative_input_ids is None
    missing = next(iter(build_loader(replace(cfg, negatives="no_such_field"), 0, 1)))
    assert not missing.negative_valid.any()
    assert len(set(drawn)) > 1
