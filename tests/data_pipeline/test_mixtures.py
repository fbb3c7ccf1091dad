"""Mixtures (data_pipeline/loader/specs.py, mixture.py, order.py, state.py): per-source repeat and
proportion with exact counts per epoch, the rotating part, the interleave's bound, keys
qualified by source, the spec language's bad inputs, and a mixture changed on resume."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from itertools import islice

import numpy as np
import pytest

from data_pipeline.loader import LoaderConfigError, LoaderStateError, build_loader, resolve_dataset
from data_pipeline.loader.mixture import interleave, interleave_bound, prefix_counts
from data_pipeline.loader.order import GlobalOrder
from data_pipeline.loader.specs import map_locations, parse_source_specs
from launch.cli import main as umt
from tests.data_pipeline.loader_fixtures import (
    keys_by_position,
    keys_only,
    write_dataset,
    write_dirty_dataset,
)

SIZES = {"a": [100] * 7, "b": [100] * 3, "c": [45, 45]}  # 700, 300 and 90 samples


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three sources of 700, 300 and 90 samples; the spec x1, x0.5, x3 (1120 samples an epoch)."""
    root = tmp_path_factory.mktemp("three")
    keys = {name: write_dataset(root / name, counts, name=name) for name, counts in SIZES.items()}
    spec = f"{root / 'a'},{root / 'b'}:x0.5,{root / 'c'}:x3"
    return root, spec, keys


def epoch_sources(order: GlobalOrder, epoch: int) -> tuple[list[str], list[str]]:
    """(source name, qualified sample key) of every position of an epoch, in order."""
    dataset = order.dataset
    ids, _ = order.samples(order.epoch_start(epoch), order.epoch_length(epoch))
    shards, indices = dataset.locate(ids)
    names = [dataset.sources[dataset.source_of_shard[s]].name for s in shards]
    keys = [f"{n}/{n}-{s - dataset.first_shard[dataset.names.index(n)]:03d}-{i:04d}"
            for n, s, i in zip(names, shards.tolist(), indices.tolist())]  # fmt: skip
    return names, keys


def test_repeats_give_exact_counts_every_epoch_and_the_half_alternates_and_covers(three):
    root, spec, keys = three
    order = GlobalOrder(resolve_dataset(spec, False), keys_only(spec, shuffle_window=64))
    halves = []
    for epoch in range(4):
        names, seen = epoch_sources(order, epoch)
        assert order.epoch_length(epoch) == 1120
        assert Counter(names) == {"a": 700, "b": 150, "c": 270}
        per_key = Counter(seen)
        assert {k: n for k, n in per_key.items() if k.startswith("a/")} == {
            f"a/{k}": 1 for k in keys["a"]
        }  # x1: every sample once
        assert {k: n for k, n in per_key.items() if k.startswith("c/")} == {
            f"c/{k}": 3 for k in keys["c"]
        }  # x3: every sample three times
        half = {k for k in per_key if k.startswith("b/")}
        assert len(half) == 150 and all(per_key[k] == 1 for k in half)  # without replacement
        halves.append(half)
    assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == {
        f"b/{k}" for k in keys["b"]
    }
    assert halves[2] == halves[0] and halves[3] == halves[1]  # the two halves alternate
    # Each source reads from its own windows of a few shards: locality as for one source.
    for source in range(3):
        assert np.diff(order.plan(0, source).window_starts).max() < 64 + 100


def test_a_quarter_covers_its_source_in_four_epochs_and_a_fraction_that_wraps_repeats_nothing(
    tmp_path,
):
    write_dataset(tmp_path / "q", [7, 3, 10], name="q")  # 20 samples
    write_dataset(tmp_path / "r", [4, 6], name="r")  # 10 samples
    spec = f"{tmp_path / 'q'}:x0.25,{tmp_path / 'r'}:x1.3"
    order = GlobalOrder(resolve_dataset(spec, False), keys_only(spec, shuffle_window=4))
    quarters, r_seen = [], Counter()
    for epoch in range(4):
        _, keys = epoch_sources(order, epoch)
        quarters.append([k for k in keys if k.startswith("q/")])
        r_keys = Counter(k for k in keys if k.startswith("r/"))
        assert sum(r_keys.values()) == [13, 13, 13, 13][epoch]  # floor(13 (e+1)) - floor(13 e)
        assert max(r_keys.values()) <= 2 and len(r_keys) == 10  # one pass + 3 more, no third
        r_seen.update(k for k, n in r_keys.items() if n == 2)
    assert [len(q) for q in quarters] == [5, 5, 5, 5]
    assert sorted(k for q in quarters for k in q) == sorted({k for q in quarters for k in q})
    assert len({k for q in quarters for k in q}) == 20  # four epochs: every sample once
    assert sorted(r_seen.values()) == [1] * 8 + [2] * 2  # the 0.3 parts: 12 of 10, then again


def test_proportions_give_their_share_of_every_epoch(tmp_path):
    write_dataset(tmp_path / "web", [30, 20], name="web")
    write_dataset(tmp_path / "coco", [200], name="coco")
    spec = [{"path": str(tmp_path / "web"), "proportion": 0.7}, f"{tmp_path / 'coco'}:30%"]
    order = GlobalOrder(resolve_dataset(spec, False), keys_only(spec, shuffle_window=16))
    for epoch in range(3):  # 250 samples an epoch: web x3.5, coco x0.375
        names, _ = epoch_sources(order, epoch)
        assert Counter(names) == {"web": 175, "coco": 75}
    thirds = [str(tmp_path / "web") + ":33.3334%", str(tmp_path / "coco") + ":66.6666%"]
    order = GlobalOrder(resolve_dataset(thirds, False), keys_only(thirds, shuffle_window=16))
    counts = [Counter(epoch_sources(order, e)[0]) for e in range(5)]
    assert sum(c["web"] for c in counts) == int(250 * 5 * 0.333334)  # exact over epochs
    assert all(abs(c["web"] - 250 * 0.333334) < 1 for c in counts)  # within 1 each epoch


def test_the_interleave_deals_every_position_once_within_its_stated_bound():
    rng = random.Random(0)
    for _ in range(300):
        k = rng.randint(1, 8)
        counts = np.array([rng.choice([0, 1, 3, rng.randint(1, 500)]) for _ in range(k)])
        counts[rng.randrange(k)] += 1  # at least one sample
        total = int(counts.sum())
        source, index = interleave(counts, 0, total)
        for s in range(k):  # each source's positions are its 0..c-1, in order
            assert index[source == s].tolist() == list(range(counts[s]))
        start = rng.randrange(total)
        size = rng.randint(1, total - start)
        got = np.bincount(source[start : start + size], minlength=k)
        assert (got == prefix_counts(counts, start + size) - prefix_counts(counts, start)).all()
        piece = interleave(counts, start, size)
        assert (piece[0] == source[start : start + size]).all()
        deviation = np.abs(got - size * counts / total)
        assert (deviation < interleave_bound(k)).all(), (counts.tolist(), start, size)
    # Two sources: every window of G holds the floor or the ceiling of its share.
    source, _ = interleave(np.array([300, 700]), 0, 1000)
    for start in range(0, 900, 7):
        assert int((source[start : start + 64] == 0).sum()) in (19, 20)  # 64 * 0.3 = 19.2


def test_the_same_counts_and_keys_on_any_split_of_ranks_micro_batch_and_workers(three):
    _, spec, _ = three
    base = keys_only(spec, shuffle_window=64)
    reference = keys_by_position(replace(base, batch_size=8), 1, 140)  # 1120 positions: epoch 0
    assert Counter(k.split("/")[0] for k in reference.values()) == {"a": 700, "b": 150, "c": 270}
    for world, batch, workers in ((2, 4, 2), (3, 5, 1), (4, 2, 0)):
        cfg = replace(base, batch_size=batch, num_workers=workers)
        rounds = 1120 // (world * batch) + 1
        got = keys_by_position(cfg, world, rounds)
        assert {p: got[p] for p in range(1120)} == reference, (world, batch, workers)


def test_state_resumes_a_mixture_on_another_topology(three):
    _, spec, _ = three
    cfg = keys_only(spec, shuffle_window=64)
    loaders = [build_loader(cfg, r, 2) for r in range(2)]
    for loader in loaders:
        list(islice(iter(loader), 5))
    state = json.loads(json.dumps(loaders[0].state_dict()))
    assert state["position"] == 30 and state["samples_by_source"] == loaders[1].sample_counts()
    assert sum(state["samples_by_source"].values()) == 30
    resumed = {}
    for rank in range(3):
        loader = build_loader(replace(cfg, batch_size=2), rank, 3)
        loader.load_state_dict(state)
        for batch in islice(iter(loader), 4):
            resumed |= {batch.position + j: k for j, k in enumerate(batch.keys)}
    reference = keys_by_position(replace(cfg, batch_size=6), 1, 10)
    assert resumed == {p: reference[p] for p in range(30, 54)}


def test_a_new_mixture_is_refused_naming_sources_unless_asked_and_then_starts_a_phase(three):
    root, spec, _ = three
    cfg = keys_only(spec, shuffle_window=64, batch_size=10)
    loader = build_loader(cfg, 0, 1)
    before = [k for b in islice(iter(loader), 50) for k in b.keys]  # 500 positions: mid-epoch 0
    state = json.loads(json.dumps(loader.state_dict()))
    new = f"{root / 'a'}:x0.1,{root / 'c'}:x3"  # b left out, a changed, c as it was
    changed = build_loader(replace(cfg, shards=new), 0, 1)
    with pytest.raises(LoaderStateError) as refused:
        changed.load_state_dict(state)
    message = str(refused.value)
    assert "sources removed: b; sources whose shards, counts or mixture changed: a;" in message
    assert "--new-mixture" in message and "\n" not in message
    changed.load_state_dict(state, new_mixture=True)
    assert changed.position == 500 and changed.epoch == 1  # a whole epoch of the new mixture
    after = [k for b in islice(iter(changed), 34) for k in b.keys]  # 70 + 270: one epoch
    assert Counter(k.split("/")[0] for k in after) == {"a": 70, "c": 270}
    assert changed.epoch == 2
    seen = Counter(k.split("/")[0] for k in before + after)
    assert changed.sample_counts() == {"a": seen["a"], "b": seen["b"], "c": seen["c"]}
    # The new phase resumes as itself, and the state keeps both phases.
    again = json.loads(json.dumps(changed.state_dict()))
    assert [(p["start"], p["epoch"]) for p in again["phases"]] == [(0, 0), (500, 1)]
    assert [s["name"] for s in again["phases"][0]["sources"]] == ["a", "b", "c"]
    assert again["phases"][1]["sources"][0] == {
        "name": "a", "samples": 700, "repeat": 0.1, "per_epoch": 70.0,
    }  # fmt: skip
    later = build_loader(replace(cfg, shards=new), 0, 1)
    later.load_state_dict(again)
    continued = [k for b in islice(iter(later), 2) for k in b.keys]
    reference = build_loader(replace(cfg, shards=new), 0, 1)
    reference.load_state_dict(state, new_mixture=True)
    assert continued == [k for b in islice(iter(reference), 36) for k in b.keys][340:]
    seen.update(k.split("/")[0] for k in continued)
    assert later.sample_counts() == {"a": seen["a"], "b": seen["b"], "c": seen["c"]}


def test_a_lone_sources_order_and_old_states_are_kept(tmp_path, caplog):
    write_dataset(tmp_path / "a", [7, 5, 6, 4], name="a")
    write_dataset(tmp_path / "b", [3, 3], name="b")
    one = keys_only(str(tmp_path / "a"))
    # A state of the format before mixtures resumes a lone source where it was.
    loader = build_loader(one, 0, 1)
    old = {k: v for k, v in loader.state_dict().items() if k in (
        "mode", "seed", "position", "epoch", "samples_per_epoch", "shuffle_window",
        "epoch_tail", "global_batch", "data_digest")} | {"format_version": 2, "position": 9}  # fmt: skip
    loader.load_state_dict(old)
    assert loader.position == 9
    # Several sources were one pool then: their epoch goes on at the next one, with a warning.
    two = keys_only(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    loader = build_loader(two, 0, 1)
    old |= {"data_digest": loader.dataset.digest(), "samples_per_epoch": 28}
    loader.load_state_dict(old)
    assert loader.position == 28 and "epoch 0 is continued at the start of epoch 1" in caplog.text


def test_keys_a_user_sees_are_qualified_by_source_with_several_sources(tmp_path):
    write_dirty_dataset(tmp_path / "web", [6, 6, 6, 6, 6])
    write_dataset(tmp_path / "coco", [4], name="dirty")  # the same key names as web's
    spec = f"web={tmp_path / 'web'},coco={tmp_path / 'coco'}"
    cfg = keys_only(spec, decode_images=True, image_size=8, batch_size=34)
    batch = next(iter(build_loader(cfg, 0, 1)))
    assert {k.split("/")[0] for k in batch.keys} == {"web", "coco"}
    assert all(k.split("/", 1)[1].startswith("dirty-") for k in batch.keys)
    assert set(batch.image_keys) >= {"coco/dirty-img-0", "web/dirty-img-0"}  # not one image
    assert {f["key"] for f in batch.failures if f["key"]} >= {"web/dirty-000-0002"}
    lone = next(iter(build_loader(keys_only(str(tmp_path / "coco")), 0, 1)))
    assert all(k.startswith("dirty-") for k in lone.keys)  # one source: keys as they are


# ------------------------------------------------------------------ the spec language


def test_short_forms_and_mappings_parse_to_the_same_sources():
    specs = parse_source_specs("coco=/d/c-{0,1}.tar:x2,/d/cc3m:30%,w=s3://b/x:4")
    assert [(s.name, s.location, s.mixture) for s in specs] == [
        ("coco", "/d/c-{0,1}.tar", {"repeat": 2.0}),
        (None, "/d/cc3m", {"proportion": 0.3}),
        ("w", "s3://b/x", {"weight": 4.0}),
    ]
    mapped = parse_source_specs([{"path": "/d/c", "name": "coco", "repeat": 0.25}, "/d/e"])
    assert [(s.name, s.location, s.mixture) for s in mapped] == [
        ("coco", "/d/c", {"repeat": 0.25}),
        (None, "/d/e", {}),
    ]
    assert parse_source_specs("http://host:8080/shards/")[0].location == "http://host:8080/shards/"


def test_locations_are_rewritten_in_the_form_they_were_given():
    def upper(location):
        return location.upper()

    assert map_locations("i2d=/a/b,wds=c/d-{0,1}.tar:x2,e:30%", upper) == (
        "i2d=/A/B,wds=C/D-{0,1}.TAR:x2,E:30%"
    )
    given = [{"path": "p", "repeat": 2, "name": "n"}, "q:4"]
    assert map_locations(given, upper) == [{"path": "P", "repeat": 2, "name": "n"}, "Q:4"]


@pytest.mark.parametrize(
    "spec, said",
    [
        ([{"path": "/d/a", "reapeat": 2}], "source /d/a: unknown field 'reapeat'"),
        ([{"name": "a", "repeat": 2}], "source 'a' (?): path must be a location"),
        ("a=/d/a:x0", "source 'a' (/d/a): repeat must be > 0 (got 0)"),
        ("a=/d/a:x-1", "source 'a' (/d/a): repeat must be > 0 (got -1)"),
        ([{"path": "/d/a", "weight": -2}], "source /d/a: weight must be > 0 (got -2)"),
        ([{"path": "/d/a", "proportion": 0}], "source /d/a: proportion must be > 0 (got 0)"),
        ([{"path": "/d/a", "repeat": "2"}], "source /d/a: repeat must be a number (got '2')"),
        ([{"path": "/d/a", "repeat": 2, "proportion": 0.5}], "give one of repeat and proportion"),
        ("a=/d/a:x30%", "source 'a' (/d/a): ':x30%' gives both a repeat (x) and a proportion"),
        ([{"path": "/d/a", "name": "a/b"}], "a name starts with a letter"),
    ],
)
def test_a_bad_source_is_one_line_naming_it_and_its_field(spec, said):
    with pytest.raises(LoaderConfigError) as refused:
        parse_source_specs(spec)
    assert said in str(refused.value) and "\n" not in str(refused.value)


def test_a_bad_mixture_is_one_line_naming_the_sources(tmp_path):
    for name, count in (("a", [5]), ("b", [5]), ("empty", [0])):
        write_dataset(tmp_path / name, count, name=name)
    a, b = tmp_path / "a", tmp_path / "b"
    cases = [
        (f"{a}:60%,{b}:30%", False, f"the proportions sum to 0.9, not 1 ({a} 0.6, {b} 0.3)"),
        (f"{a}:60%,{b}", False, f"source {b} has no proportion while source {a} has one"),
        (f"{a}:4,{b}", False, f"source {a}: a weight (:4) only applies with resampled=True"),
        (f"{a}:x2,{b}", True, f"source {a}: repeat is for epoch mode"),
        (f"{a},x={tmp_path / 'empty'}", False, "source 'x' (" + str(tmp_path / "empty")),
        (f"{a},{tmp_path / 'empty'}", False, "source 'empty' ("),
        (f"{a},{tmp_path / 'x' / 'a'}", False, "would both be named 'a'"),
    ]
    (tmp_path / "x").mkdir()
    write_dataset(tmp_path / "x" / "a", [2], name="a")
    for spec, resampled, said in cases:
        with pytest.raises(LoaderConfigError) as refused:
            resolve_dataset(spec, resampled)
        assert said in str(refused.value) and "\n" not in str(refused.value), spec
    with pytest.raises(LoaderConfigError, match="holds no samples"):
        resolve_dataset(f"{a},x={tmp_path / 'empty'}", False)


# ------------------------------------------------------------------ the audit tools


def test_order_counts_and_inspect_report_samples_per_source(three, capsys):
    _, spec, _ = three
    args = ["data", "order", spec, "--batch-size", "112", "--global", "--counts", "--seed", "7"]
    assert umt([*args, "--shuffle-window", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11 and lines[-1] == "total\ta=700 b=150 c=270"  # 10 steps: epoch 0
    for line in lines[:-1]:
        counts = dict(cell.split("=") for cell in line.split("\t")[1].split())
        assert abs(int(counts["a"]) - 70) < 2 and abs(int(counts["c"]) - 27) < 2
    assert umt(["data", "inspect", spec, "--samples", "1", "--epoch", "3"]) == 0
    out = capsys.readouterr().out
    assert "source b: 3 shards, 300 samples (x0.5: 150 per epoch; 150 in epoch 3)" in out
    assert "total: 1090 samples; epoch 3: 1120" in out and "  a/a-0" in out


def test_a_subset_is_a_source_of_a_mixture_over_its_kept_samples(tmp_path):
    from data_pipeline.curate.options import CurateOptions
    from data_pipeline.curate.run import curate
    from tests.data_pipeline.loader_fixtures import sample_members, write_manifest, write_tar

    folder = tmp_path / "dups"
    folder.mkdir()
    for shard in range(2):  # 12 samples a shard, images 0-7 then 0-3 again: 4 exact copies
        members = [m for i in range(12) for m in sample_members(
            f"d-{shard}-{i:02d}", shard * 100 + i % 8, f"d-{shard}-{i:02d}", [f"a photo {i}"])]  # fmt: skip
        write_tar(folder / f"data-{shard:06d}.tar", members)
    write_manifest(folder, {"data-000000.tar": 12, "data-000001.tar": 12})
    curate(CurateOptions([str(folder)], str(tmp_path / "sub"), dedup=("exact",)))
    write_dataset(tmp_path / "other", [5], name="o")
    spec = f"{tmp_path / 'sub'}:x2,{tmp_path / 'other'}"
    order = GlobalOrder(resolve_dataset(spec, False), keys_only(spec, shuffle_window=4))
    for epoch in range(2):
        ids, _ = order.samples(order.epoch_start(epoch), order.epoch_length(epoch))
        shards, indices = order.dataset.locate(ids)
        kept = Counter((int(s), int(i)) for s, i in zip(shards, indices) if s < 2)
        assert len(kept) == 16 and set(kept.values()) == {2}  # x2 of the 16 kept, none removed
        assert all(i < 8 for _, i in kept)  # the copies (positions 8-11) are not among them


def test_the_model_card_lists_each_sources_mixture_counts_and_the_phases(three):
    from umt.model_card import _data_section

    root, spec, _ = three
    cfg = keys_only(spec, shuffle_window=64, batch_size=16)
    loader = build_loader(cfg, 0, 1)
    list(islice(iter(loader), 7))  # 112 samples
    changed = build_loader(replace(cfg, shards=f"{root / 'a'}:x0.1,{root / 'c'}:x3"), 0, 1)
    changed.load_state_dict(loader.state_dict(), new_mixture=True)
    list(islice(iter(changed), 2))  # what a checkpoint at step 9 records
    seen = changed.sample_counts()
    text = _data_section(changed.summary(), {"data": {"train": {"shards": changed.cfg.shards}}})
    assert "| source | samples | shards | mixture | per epoch | seen |" in text
    assert f"| a | 700 | 7 | x0.1 | 70 | {seen['a']:,} |" in text
    assert f"| c | 90 | 2 | x3 | 270 | {seen['c']:,} |" in text
    assert "- from sample 0 (step 0): a x1, b x0.5, c x3" in text
    assert "- from sample 112 (step 7): a x0.1, c x3" in text
    assert f"Seen from sources no longer in the mixture: b {seen['b']:,}" in text
