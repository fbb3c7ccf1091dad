"""Curation (`umt data curate`, data_pipeline/curate/): the rules on planted cases made from real
photos and the built-in scenes, the subset as every reader sees it, reruns, bad input. In process."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.curate.near import NearPairs, first_of_groups, hamming_pairs
from data_pipeline.curate.options import CurateOptions
from data_pipeline.curate.run import curate
from data_pipeline.loader import LoaderConfigError, resolve_dataset
from data_pipeline.loader.stream import iter_raw_samples
from launch.cli import main as umt
from tests.data_pipeline.curate_cases import (
    Planted,
    decontamination_report,
    dedup_report,
    plant,
    read_removed,
)
from tests.data_pipeline.loader_fixtures import write_dataset, write_dirty_dataset, write_manifest


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    return plant(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def table(tmp_path_factory, planted) -> Path:
    """The planted cases' hash table, made once: each test's run reads it (nothing recomputed)."""
    out = tmp_path_factory.mktemp("scanned") / "all"
    curate(CurateOptions([str(planted.train)], str(out), decontaminate=[str(planted.eval)]))
    return out / "table"


def run(planted: Planted, table: Path, out: Path, **options) -> list[dict]:
    curate(CurateOptions([str(planted.train)], str(out), table=str(table), **options))
    return read_removed(out)


def kept_keys(subset: Path) -> list[str]:
    return [s.key for s in iter_raw_samples(str(subset))]


# --- the search and the grouping -----------------------------------------------------------------


@pytest.mark.parametrize("radius, table_from", [(0, 1), (3, 10**9), (8, 1), (8, 10**9), (11, 1)])
def test_hamming_search_finds_exactly_the_brute_force_pairs(radius, table_from, monkeypatch):
    """Both bucket lookups (a table over all chunk values, a binary search) at several radii."""
    from data_pipeline.curate import near

    monkeypatch.setattr(near, "TABLE_FROM", table_from)
    rng = np.random.default_rng(radius)
    entries = rng.integers(0, 2**64, size=2000, dtype=np.uint64)
    queries = entries[:300].copy()
    for i in range(len(queries)):  # 0-13 bits flipped: pairs on both sides of the radius
        for bit in rng.choice(64, size=rng.integers(0, 14), replace=False):
            queries[i] ^= np.uint64(1) << np.uint64(bit)
    q, e, d = hamming_pairs(queries, entries, radius)
    distances = np.bitwise_count(queries[:, None] ^ entries[None, :])
    want_q, want_e = np.nonzero(distances <= radius)
    assert np.array_equal(q, want_q) and np.array_equal(e, want_e)
    assert np.array_equal(d, distances[want_q, want_e]) and len(q) > 0


def test_the_first_of_a_chain_keeps_its_far_end():
    """a~b and b~c but not a~c: a keeps, b goes (named a's duplicate), c stays (b kept no one)."""
    pairs = NearPairs(np.array([0, 1]), np.array([1, 2]), np.array([3, 3]), np.array([0.0, 0.0]))
    assert list(first_of_groups(pairs, 3)) == [(1, 0, 0)]


# --- the rules on the planted cases --------------------------------------------------------------


def test_near_dedup_meets_its_goals_on_planted_cases(planted, table, tmp_path):
    """Re-encodes at JPEG 50-70, resizes to 50-80%, crops of up to 10% of the border found;
    distinct crops of one photo overlapping 44% and look-alike scenes kept."""
    report = dedup_report(planted, run(planted, table, tmp_path / "s", dedup=("near",)), "near_duplicate")  # fmt: skip
    assert report["precision"] >= 0.98 and report["recall"] >= 0.95, report
    assert min(report["per_kind"].values()) >= 0.95, report


def test_exact_dedup_removes_copies_of_the_same_pixels_only(planted, table, tmp_path):
    removed = run(planted, table, tmp_path / "s", dedup=("exact",))
    report = dedup_report(planted, removed, "exact_duplicate")
    assert report["precision"] == 1.0 and report["recall"] == 1.0, report  # PNG of JPEG pixels too
    assert {planted.truth[r["key"]]["kind"] for r in removed} <= {
        "original",
        "exact",
        "same_pixels",
    }


def test_decontamination_removes_copies_of_evaluation_images(planted, table, tmp_path):
    removed = run(planted, table, tmp_path / "s", decontaminate=[str(planted.eval)])
    report = decontamination_report(planted, removed)
    assert report["recall"] >= 0.95 and report["removed"] >= planted.eval_copies, report
    assert all(r["evidence"]["hamming"] <= 8 for r in removed)


def test_caption_rules_and_evaluation_captions(tmp_path):
    write_dataset(tmp_path / "train", [4, 4], name="t")  # captions "caption 0 of image N of t"
    write_dataset(tmp_path / "eval", [2], name="e")
    eval_shard = tmp_path / "eval" / "data-000000.tar"
    with tarfile.open(eval_shard) as tar:  # the evaluation set holds one training caption
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = [(n, b"Caption 0  of image 5 OF t" if n.endswith("0000.txt") else d) for n, d in members]  # fmt: skip
    from tests.data_pipeline.loader_fixtures import write_tar

    write_tar(eval_shard, members)
    write_manifest(tmp_path / "eval", {"data-000000.tar": 2})
    options = CurateOptions(
        [str(tmp_path / "train")], str(tmp_path / "s"), max_caption_words=7,
        decontaminate=[str(tmp_path / "eval")], decontaminate_captions=True,
    )  # fmt: skip
    curate(options)
    removed = {r["key"]: r for r in read_removed(tmp_path / "s")}
    assert removed["t-001-0001"]["reason"] == "eval_caption"  # image 5, case and spaces aside
    assert removed["t-001-0001"]["evidence"]["eval"]["key"] == "e-000-0000"
    # The evaluation images are drawn as training images 0 and 1 are (loader_fixtures' colours).
    reasons = {key: r["reason"] for key, r in removed.items()}
    assert reasons == {
        "t-000-0000": "eval_duplicate",
        "t-000-0001": "eval_duplicate",
        "t-001-0001": "eval_caption",
    }  # fmt: skip (7 words each: none too long)
    summary = curate(CurateOptions([str(tmp_path / "train")], str(tmp_path / "s2"), min_caption_words=8))  # fmt: skip
    assert {r["reason"] for r in read_removed(tmp_path / "s2")} == {"too_few_words"}
    assert summary.kept == 0 and summary.removed == {"too_few_words": 8}
    with pytest.raises(LoaderConfigError, match="holds no samples"):  # nothing to train on
        resolve_dataset(str(tmp_path / "s2"), resampled=False)


def test_a_second_pass_with_other_thresholds_recomputes_nothing(planted, table, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in table.iterdir()}
    removed = run(planted, table, tmp_path / "s", dedup=("near",), near_hamming=4, near_color=0.1)
    assert {p.name: p.stat().st_mtime_ns for p in table.iterdir()} == before
    assert not (tmp_path / "s" / "table").exists()
    record = json.loads((tmp_path / "s/.umt-curate/done/train-000000.json").read_text())
    assert record["hashes"] in before
    stricter = dedup_report(planted, removed, "near_duplicate")
    default = dedup_report(planted, run(planted, table, tmp_path / "d", dedup=("near",)), "near_duplicate")  # fmt: skip
    assert stricter["removed"] < default["removed"]


# --- the subset as readers see it ----------------------------------------------------------------


def test_unreadable_samples_are_removed_with_their_reason(tmp_path):
    valid, bad = write_dirty_dataset(tmp_path / "dirty", [6, 6, 6, 6])
    summary = curate(CurateOptions([str(tmp_path / "dirty")], str(tmp_path / "s")))
    removed = read_removed(tmp_path / "s")
    # Samples past a tar's cut have no index entry: no key, their shard and position instead.
    named = {r["key"]: r["evidence"]["error"] for r in removed if r["key"]}
    assert named == {k: v for k, v in bad.items() if k in named} and len(named) >= 4
    unnamed = [(r["shard"].rsplit("/", 1)[1], r["position"]) for r in removed if not r["key"]]
    assert all(name == "data-000003.tar" and position > 3 for name, position in unnamed)
    assert len(removed) == len(bad) and summary.removed == {"unreadable": len(bad)}
    assert sorted(kept_keys(tmp_path / "s")) == sorted(valid) and summary.kept == len(valid)


def test_the_global_order_covers_the_kept_samples_once_per_epoch(planted, table, tmp_path, capsys):
    subset = tmp_path / "s"
    run(planted, table, subset, dedup=("exact", "near"))
    kept = set(kept_keys(subset))
    dataset = resolve_dataset(str(subset), resampled=False)
    assert dataset.total_samples == len(kept) < len(planted.truth)
    args = ["data", "order", str(subset), "--batch-size", "7", "--global", "--sample-keys"]
    assert umt(args) == 0
    steps = [line.split("\t")[1].split() for line in capsys.readouterr().out.splitlines()]
    first_epoch = [k for step in steps for k in step][: len(kept)]
    assert sorted(first_epoch) == sorted(kept)
    # Resuming at step 3 gives the same later steps (the state is a position over kept samples).
    assert umt([*args, "--start-step", "3"]) == 0
    later = [line.split("\t")[1].split() for line in capsys.readouterr().out.splitlines()]
    assert later == steps[3:]


def test_a_subset_whose_source_changed_is_refused_in_one_line(tmp_path, capsys):
    write_dataset(tmp_path / "d", [5, 5])
    curate(CurateOptions([str(tmp_path / "d")], str(tmp_path / "s")))
    write_dataset(tmp_path / "d", [5, 5], name="other")  # same names and counts, other bytes
    with pytest.raises(LoaderConfigError, match=r"source shard .*data-000000.tar changed"):
        resolve_dataset(str(tmp_path / "s"), resampled=False)
    assert umt(["data", "inspect", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data-000000.tar changed since the subset was made" in err[0]


def test_inspect_shows_kept_and_removed_by_reason_and_source(planted, table, tmp_path, capsys):
    run(planted, table, tmp_path / "s", dedup=("exact",), decontaminate=[str(planted.eval)])
    assert umt(["data", "inspect", str(tmp_path / "s"), "--samples", "1", "--verify"]) == 0
    out = capsys.readouterr().out
    removed = read_removed(tmp_path / "s")
    exact = sum(r["reason"] == "exact_duplicate" for r in removed)
    assert f"exact_duplicate {exact}" in out and f"{planted.train}:" in out
    assert "verified: 9 of 9 source shards have the recorded sha256" in out


def test_materialized_shards_hold_the_kept_samples_byte_for_byte(tmp_path):
    write_dataset(tmp_path / "d", [5, 6, 4])
    target = tmp_path / "m"
    options = CurateOptions([str(tmp_path / "d")], str(tmp_path / "s"), dedup=("exact",))
    options.min_caption_words, options.materialize = 8, str(target)  # 7 words: all removed
    curate(options)
    assert json.loads((target / "manifest.json").read_text())["total_samples"] == 0
    options = CurateOptions([str(tmp_path / "d")], str(tmp_path / "s2"), materialize=str(target))
    with pytest.raises(Exception, match="another subset's shards"):
        curate(options)
    options.overwrite = True
    summary = curate(options)
    subset = [(s.key, s.image, s.text) for s in iter_raw_samples(str(tmp_path / "s2"))]
    shards = [(s.key, s.image, s.text) for s in iter_raw_samples(str(target))]
    assert subset == shards and len(shards) == summary.kept == 15


def test_similarity_is_the_exports_cosine_and_keep_top_keeps_the_top(tmp_path):
    import umt
    from data_pipeline.builtin import write_tokenizer
    from tests.data_pipeline.curate_cases import plant_swapped, write_random_export

    export = write_random_export(tmp_path / "export", "tiny", write_tokenizer(tmp_path / "tok"), 32)
    plant_swapped(tmp_path / "scenes", count=20, swapped=4, side=32)
    options = CurateOptions([str(tmp_path / "scenes")], str(tmp_path / "s"), model=str(export))
    options.keep_top, options.score_batch = 0.3, 7
    curate(options)
    model, processor = umt.load(str(export))
    samples = list(iter_raw_samples(str(tmp_path / "scenes")))
    import io

    from PIL import Image

    inputs = processor(images=[Image.open(io.BytesIO(s.image)) for s in samples], text=[s.text for s in samples])  # fmt: skip
    want = (model.encode_image(inputs["pixel_values"]) * model.encode_text(inputs["input_ids"], inputs["attention_mask"])).sum(-1)  # fmt: skip
    import pyarrow.parquet as pq

    scores = np.concatenate([pq.read_table(p)["score"].to_numpy() for p in sorted((tmp_path / "s/table").glob("scores-*"))])  # fmt: skip
    # Batches of 7 padded otherwise than one batch of 20: equal to float32 rounding.
    assert len(scores) == 20 and np.allclose(scores, want.detach().numpy(), atol=1e-5)
    top = {samples[i].key for i in np.argsort(-want.detach().numpy(), kind="stable")[:6]}
    assert set(kept_keys(tmp_path / "s")) == top
    removed = read_removed(tmp_path / "s")
    assert {r["reason"] for r in removed} == {"below_top_fraction"} and len(removed) == 14


def test_a_subset_curated_again_refers_to_the_original_shards(planted, table, tmp_path):
    """Curating a subset reads only its kept samples; the new subset names the source tars and
    their positions, and keeps what both rules keep."""
    run(planted, table, tmp_path / "first", dedup=("exact",))
    curate(CurateOptions([str(tmp_path / "first")], str(tmp_path / "second"), dedup=("near",)))
    first = json.loads((tmp_path / "first" / "subset.json").read_text())
    second = json.loads((tmp_path / "second" / "subset.json").read_text())
    assert [s["path"] for s in second["shards"]] == [
        s["path"] for s in first["shards"] if s["kept"]
    ]
    assert second["samples"] == first["kept"]
    both = run(planted, table, tmp_path / "both", dedup=("exact", "near"))
    assert set(kept_keys(tmp_path / "second")) == set(kept_keys(tmp_path / "both"))
    assert len(both) == len(planted.truth) - second["kept"]


# --- bad input: one line, nothing lost -----------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--keep-top", "0"], "--keep-top must be in (0, 1] (got 0.0)"),
        (["--near-color", "3"], "--near-color must be in [0, 2] (got 3.0)"),
        (["--min-similarity", "0.2"], "--min-similarity and --keep-top need --model"),
        (["--min-caption-words", "5", "--max-caption-words", "2"], "is above --max-caption-words"),
    ],
)
def test_out_of_range_options_are_refused_in_one_line(tmp_path, capsys, flags, message):
    write_dataset(tmp_path / "d", [2])
    assert umt(["data", "curate", str(tmp_path / "d"), "--out", str(tmp_path / "s"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s").exists()


def test_a_model_that_is_no_export_and_an_eval_set_without_images_are_named(tmp_path, capsys):
    write_dataset(tmp_path / "d", [3])
    (tmp_path / "not_export").mkdir()
    (tmp_path / "not_export" / "config.json").write_text("{}")
    base = ["data", "curate", str(tmp_path / "d"), "--out", str(tmp_path / "s")]
    assert umt([*base, "--model", str(tmp_path / "not_export"), "--keep-top", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not_export: not a UMT export (no umt_export.json in it)" in err[0]
    write_dataset(tmp_path / "eval", [2])
    shard = tmp_path / "eval" / "data-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    from tests.data_pipeline.loader_fixtures import write_tar

    write_tar(shard, [(n, d) for n, d in members if not n.endswith(".jpg")])
    write_manifest(tmp_path / "eval", {"data-000000.tar": 2})
    assert umt([*base, "--decontaminate", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--decontaminate {tmp_path / 'eval'}: no readable image among its 2" in err[0]  # fmt: skip
    assert "missing_image" in err[0]


def test_another_run_into_the_same_folder_is_refused_then_replaced_on_request(tmp_path, capsys):
    write_dataset(tmp_path / "d", [3])
    base = ["data", "curate", str(tmp_path / "d"), "--out", str(tmp_path / "s")]
    assert umt([*base, "--dedup", "exact"]) == 0
    first = (tmp_path / "s" / "subset.json").read_bytes()
    assert umt([*base, "--dedup", "near"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "dedup was ['exact'], now ['near']" in err[0] and "--overwrite" in err[0]
    )
    assert (tmp_path / "s" / "subset.json").read_bytes() == first
    assert umt([*base, "--dedup", "near", "--overwrite"]) == 0
    assert json.loads((tmp_path / "s" / "subset.json").read_text())["rules"]["dedup"] == ["near"]


def test_the_model_card_names_the_subset_and_its_rules(tmp_path):
    from umt.model_card import _data_section

    write_dataset(tmp_path / "d", [4, 4])  # captions of 7 words
    options = CurateOptions([str(tmp_path / "d")], str(tmp_path / "s"), dedup=("exact",))
    options.min_caption_words = options.max_caption_words = 7
    curate(options)

    summary = resolve_dataset(str(tmp_path / "s"), False).summary()  # what a checkpoint records
    text = _data_section(summary, {"data": {"train": {"shards": str(tmp_path / "s")}}})
    assert f"is the subset `{tmp_path / 's'}`" in text and f"of `{tmp_path / 'd'}`" in text
    assert "`dedup`: ['exact']" in text and "`min_caption_words`: 7" in text
    assert "8 of 8 samples kept" in text and "removed: none" in text
    assert resolve_dataset(str(tmp_path / "d"), False).sources[0].subset is None


def test_identical_images_searched_once_decide_as_if_each_were_searched(planted, table, tmp_path):
    """Copies with identical features (byte copies, PNGs of the same pixels) stand in the search
    as one: the decisions equal those of the search over every image, sample by sample."""
    from data_pipeline.curate.near import near_pairs
    from data_pipeline.curate.rules import Decisions, load_samples, near_duplicates

    run(planted, table, tmp_path / "s", dedup=("near",))
    done = sorted((tmp_path / "s/.umt-curate/done").glob("train-*.json"))
    samples = load_samples([json.loads(p.read_text()) for p in done], table)
    options = CurateOptions(["x"], "x", dedup=("near",))
    grouped = Decisions([None] * len(samples), [None] * len(samples))
    near_duplicates(samples, grouped, options)
    pairs = near_pairs(samples.codes, samples.hists, options.near_hamming, options.near_color)
    every = {removed: kept for removed, kept, _ in first_of_groups(pairs, len(samples))}
    assert {i: e["kept"]["position"] + 64 * samples.shards.index(e["kept"]["shard"])
            for i, e in enumerate(grouped.evidence) if e} == {
        i: int(samples.position[k]) + 64 * int(samples.shard[k]) for i, k in every.items()
    }  # fmt: skip
    assert sum(r is not None for r in grouped.reason) > 300


def test_perceptual_hashes_are_the_median_bits_of_each_views_low_frequencies():
    """The batched, shared-span computation equals pHash's definition view by view: the 8x8
    lowest DCT-II frequencies of the view's 32x32 area resample, each bit "above the median"."""
    from data_pipeline.curate import features

    rng = np.random.default_rng(0)
    thumbs = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    n = np.arange(32)
    dct = 2 * np.cos(np.pi * np.outer(np.arange(8), 2 * n + 1) / 64)
    for thumb, got in zip(thumbs, features.perceptual_hashes(thumbs)):
        grey = thumb.astype(np.float64) @ features.LUMA
        bits = []
        for x0, y0, x1, y1 in features.view_boxes():
            rows, cols = features.area_matrix(y0, y1), features.area_matrix(x0, x1)
            low = (dct @ rows @ grey @ cols.T @ dct.T).ravel()
            bits.append(low > np.median(low))
        assert np.packbits(np.array(bits), axis=1).tobytes() == got
    assert len(features.view_boxes()) == 19
