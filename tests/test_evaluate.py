"""Retrieval evaluation: recall on known matrices, ITM re-ranking bounds, ranks and exports agree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, run_torchrun
from tests.shard_writer import write_color_shards
from umt.evaluate import itm_pair_metrics, itm_pair_scores, recall_at_k, rerank_topk


def test_evaluation_gives_the_tensors_an_exports_processor_gives_from_the_same_file():
    """A 640x480 JPEG to 64 px would be decoded at 1/4 scale in training (data.jpeg_draft);
    evaluation decodes it in full, as a user's PIL image is: the same tensor as `eval_pixels` (the
    processor an export carries), bit for bit."""
    import io
    import random

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from data_pipeline.pixels import eval_pixels
    from data_pipeline.transforms import ImageTransformConfig, normalize_images, transform_image
    from umt.evaluate import eval_transform

    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    for photo in load_sample_images().images:
        buf = io.BytesIO()
        Image.fromarray(photo).crop((0, 0, 640, 427)).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        ours = transform_image(data, eval_transform(64), random.Random(0))
        want = eval_pixels([Image.open(io.BytesIO(data))], 64, mean, std)
        assert torch.equal(normalize_images([ours], mean, std), want)
        draft = transform_image(data, ImageTransformConfig(64, train=False), random.Random(0))
        assert not np.array_equal(draft, ours)  # what training's draft decode would have given


def test_recall_on_a_hand_made_matrix_with_five_captions_per_image():
    # 2 images x 5 captions. Image 0's captions are texts 0-4, image 1's are 5-9.
    text_to_image = torch.tensor([0] * 5 + [1] * 5)
    i2t = torch.zeros(2, 10)
    i2t[0, 7] = 3.0  # image 0 ranks a wrong caption first ...
    i2t[0, 2] = 2.0  # ... and its own second: i2t R@1 miss, R@5 hit
    i2t[1, 6] = 1.0  # image 1: own caption first
    t2i = torch.zeros(10, 2)
    t2i[:, 1] = 1.0  # every text picks image 1: right for texts 5-9 only
    r = recall_at_k(i2t, t2i, text_to_image)
    assert r["i2t_r1"] == 50.0 and r["i2t_r5"] == 100.0
    assert r["t2i_r1"] == 50.0 and r["t2i_r5"] == 100.0  # only 2 images: R@5 = 100
    assert r["r_mean"] == pytest.approx((r["i2t_mean"] + r["t2i_mean"]) / 2)


def test_ties_rank_the_lower_index_first():
    text_to_image = torch.tensor([0, 1, 2])
    flat = torch.zeros(3, 3)  # every score tied
    r = recall_at_k(flat, flat, text_to_image, ks=(1,))
    # ties -> candidate 0 first: only query 0 is right in each direction
    assert r["i2t_r1"] == r["t2i_r1"] == 33.3333  # percent, to 4 decimals


def test_itm_rerank_only_reorders_inside_the_itc_top_k():
    itc = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    itm = torch.tensor([[0.0, 5.0, 100.0, 99.0], [1.0, 1.0, 1.0, 1.0]])  # loves outside candidates

    def score(rows, cands):
        return itm[rows, cands]

    out = rerank_topk(itc, 2, score)
    order = out.argsort(dim=1, descending=True)
    assert order[0].tolist() == [1, 0, 2, 3]  # ITM reorders 0 and 1; 2 and 3 stay below, ITC order
    assert order[1, :2].tolist() == [2, 3] or order[1, :2].tolist() == [3, 2]
    assert set(order[1, :2].tolist()) == {2, 3} and order[1, 2:].tolist() == [1, 0]
    assert (out[:, :2].min() if False else out[0, [0, 1]].min()) > out[0, [2, 3]].max()


def test_itm_pair_scores_in_batches_match_one_pair_at_a_time(tmp_path):
    from transformers import AutoTokenizer

    from data_pipeline.builtin import tokenizer_vocab, write_tokenizer
    from umt.model import build_model
    from umt.model.config import preset_config

    torch.manual_seed(0)
    cfg = preset_config("tiny")
    cfg.text.vocab_size = len(tokenizer_vocab())
    model = build_model(cfg, log_table=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tok")))
    pixels = torch.randn(5, 3, 32, 32)
    pos = ["a red circle", "a small blue square above a large red circle", "a green triangle",
           "there is a white square", "a picture of a large purple circle"]  # fmt: skip
    neg = ["a blue circle", "a small red square above a large blue circle", "a red triangle",
           "a white circle", "a small purple circle"]  # fmt: skip
    p_pos, p_neg = itm_pair_scores(model, pixels, pos, neg, tokenizer, 24, batch_size=3)
    with torch.no_grad():
        for i in range(5):
            for text, got in ((pos[i], p_pos[i]), (neg[i], p_neg[i])):
                enc = tokenizer([text], return_tensors="pt")
                want = model.score_pairs(enc["input_ids"], enc["attention_mask"], pixels[i : i + 1])
                assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_itm_pair_metrics_count_both_sides_of_the_threshold_and_the_preference():
    pos, neg = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.1, 0.7, 0.2])
    got = itm_pair_metrics(pos, neg)
    assert got["accuracy"] == pytest.approx(100 * 4 / 6)  # 0.9, 0.6 above; 0.1, 0.2 below
    assert got["preference"] == pytest.approx(100 * 2 / 3)  # pair 1 prefers its negative


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory, minilm_dir):
    """A tiny model trained 2 steps (synthetic data), its checkpoint and its export (read only:
    shared by the tests of this module)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "launch.train", f"output_dir={run}", "model.preset=tiny",
        "data.train.synthetic=true", f"data.tokenizer={minilm_dir}", "data.train.max_text_len=16",
        "train.steps=2", "train.micro_batch_size=4", "model.image.image_size=32",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    export = tmp_path / "export"
    subprocess.run(
        [sys.executable, "-m", "launch.cli", "export", str(run / "checkpoints"), str(export)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return run / "checkpoints", export


@pytest.mark.slow
def test_one_and_two_ranks_and_checkpoint_and_export_and_s3_give_identical_reports(
    tmp_path, trained_export
):
    """`umt eval` of the export and of the checkpoint, the same on 2 ranks, and the export on
    shards read from moto's S3 endpoint (through a cache folder): one report."""
    from tests.storage_servers import moto_s3

    ckpt, export = trained_export
    shards = write_color_shards(tmp_path / "shards", n_images=7, per_shard=3)
    reports = {}
    with moto_s3() as s3:
        url = s3.upload_folder(shards, "eval/shards")
        runs = (("export", export, shards), ("checkpoint", ckpt, shards), ("s3", export, url))
        for name, model, where in runs:
            out = tmp_path / f"{name}.json"
            cmd = [sys.executable, "-m", "launch.cli", "eval", "--model", str(model), "--shards",
                   str(where), "--out", str(out), "--itm-rerank", "4", "--batch-size", "3",
                   "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "i2t_r1" in proc.stdout  # the printed table
            reports[name] = json.loads(out.read_text())
    out2 = tmp_path / "two_ranks.json"
    run_torchrun(REPO / "tests" / "_ranks_evaluate.py", str(export), str(shards), str(out2))
    two = json.loads(out2.read_text())
    one = reports["export"]
    assert one["images"] == 7 and one["texts"] == 14 and reports["s3"]["images"] == 7
    for scorer in ("itc", "itm"):
        assert one[scorer] == reports["checkpoint"][scorer] == two[scorer] == reports["s3"][scorer]


@pytest.mark.slow
def test_zero_shot_classification_labels_images_by_caption(tmp_path, trained_export):
    """Class-name prompts against images whose caption is the class name; images that do not
    decode are counted and left out (they stopped the run)."""
    import tarfile

    _, export = trained_export
    shards = write_color_shards(tmp_path / "shards", n_images=6, per_shard=3, captions=1)
    # Re-caption: the class of image i is its colour name, given as the caption.
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for m, data in members:
                if m.name.endswith(".txt"):
                    data = data.decode().split()[1].encode()  # "a red picture" -> "red"
                    m.size = len(data)
                if m.name.endswith((".jpg", ".png")) and tar_path.name.endswith("000001.tar"):
                    data = data[: len(data) // 3]  # a cut image: counted, not the end of the run
                    m.size = len(data)
                tar.addfile(m, __import__("io").BytesIO(data))
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\nyellow\npurple\norange\nwhite\n")
    out = tmp_path / "zs.json"
    cmd = [sys.executable, "-m", "launch.cli", "eval", "--model", str(export), "--shards",
           str(shards), "--classes", str(classes), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["samples"] == 3 and report["unlabelled"] == 0 and report["classes"] == 7
    assert report["unreadable"] == 3 and "3 unreadable left out" in proc.stdout
    assert 0 <= report["top1"] <= report["top5"] <= 100
    assert "top-1" in proc.stdout


@pytest.mark.slow
def test_retrieval_counts_the_images_it_leaves_out(tmp_path, trained_export):
    """An image that does not decode is left out of retrieval and counted in the report and its
    printed table (it was only in a log line)."""
    import io
    import tarfile

    _, export = trained_export
    shards = write_color_shards(tmp_path / "shards", n_images=7, per_shard=3)
    tar_path = shards / "data-000001.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    cut = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == cut:
                data = data[: len(data) // 3]
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "launch.cli", "eval", "--model", str(export), "--shards",
           str(shards), "--out", str(out), "--batch-size", "3"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images"] == 6 and report["unreadable"] == 1
    assert "6 images, 12 texts, 1 unreadable left out" in proc.stdout
    assert "skipped {'corrupt_image': 1}" in proc.stderr


def eval_scalars(run_dir, prefix: str) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(prefix):
                values[tag.removeprefix(prefix)] = acc.Scalars(tag)[-1].value
    return values


@pytest.mark.slow
def test_zero3_evaluation_with_uneven_work_per_rank_finishes_and_matches_umt_eval(
    tmp_path, minilm_dir
):
    """ZeRO-3 gathers parameters in every forward, a collective: 33 images over 2 ranks in
    batches of 4 give the ranks unequal forward counts (embedding and ITM re-ranking), which
    deadlocked or crashed before ranks ran in lockstep."""
    shards = write_color_shards(tmp_path / "eval", n_images=33, per_shard=5)
    run = tmp_path / "run"
    run_torchrun(
        REPO / "launch" / "train.py",
        f"output_dir={run}", "model.preset=tiny", "model.image.image_size=32",
        "data.train.synthetic=true", f"data.tokenizer={minilm_dir}",
        "data.train.max_text_len=16", "data.eval.max_text_len=16", f"data.eval.shards={shards}",
        "train.steps=1", "train.micro_batch_size=4", "train.collective_timeout_min=2",
        "zero.stage=3", "zero.stage3_param_persistence_threshold=0",
        "eval.every_steps=1", "eval.itm_rerank_k=4",
        nproc=2,
    )  # fmt: skip
    during = eval_scalars(run, "eval/eval/")
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "launch.cli", "eval", "--model", str(run / "checkpoints"),
           "--shards", str(shards), "--out", str(out), "--itm-rerank", "4", "--batch-size", "4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images"] == 33
    want = {k: v for k, v in report["itc"].items()} | {
        f"itm_{k}": v for k, v in report["itm"].items()
    }
    assert set(want) <= set(during)
    for key, value in want.items():  # float32 in TensorBoard
        assert during[key] == pytest.approx(value, abs=1e-4), key
