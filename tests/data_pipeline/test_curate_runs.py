"""Curation as processes: kill -9 and rerun, ranks under torchrun, training on a subset against
training on its materialized shards, and the open_clip scorer."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.data_pipeline.curate_cases import plant, read_removed
from tests.test_train import demo_shards, sample_log, scalars, train  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def curate_cli(*args: str, env: dict | None = None, check: bool = True, launcher=()):
    proc = subprocess.run(
        [*launcher, "-m", "launch.cli", "data", "curate", *args, "--no-progress"]
        if launcher
        else [sys.executable, "-m", "launch.cli", "data", "curate", *args, "--no-progress"],
        cwd=REPO,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,  # the failpoint kills this process group, not pytest's
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file a run leaves (its state's lock and records aside), by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".umt-curate" not in p.parts
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return plant(tmp_path_factory.mktemp("planted"))


def test_kill_9_mid_curation_then_rerun_writes_the_same_subset_byte_for_byte(tmp_path, planted):
    """Killed (the whole process group, by the UMT_CURATE_FAILPOINT hook) after a shard's
    scan with another worker mid-shard, then between removed.jsonl and subset.json: each rerun
    ends with the bytes of a run never stopped, materialized shards included."""
    args = [
        str(planted.train), "--out", str(tmp_path / "s"), "--dedup", "exact,near",
        "--decontaminate", str(planted.eval), "--workers", "2",
        "--materialize", str(tmp_path / "m"),
    ]  # fmt: skip
    curate_cli(*args)
    reference = outputs(tmp_path / "s") | {f"m/{k}": v for k, v in outputs(tmp_path / "m").items()}
    assert "subset.json" in reference and "m/data-000000.tar" in reference
    for point in ("train-000004", "finalize"):
        shutil.rmtree(tmp_path / "s")
        shutil.rmtree(tmp_path / "m")
        killed = curate_cli(*args, env={"UMT_CURATE_FAILPOINT": point}, check=False)
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert not (tmp_path / "s" / "subset.json").exists()
        done = list((tmp_path / "s" / ".umt-curate" / "done").glob("*.json"))
        # 9 shards + 1 eval. Killed once train-000004's record is written: most often with
        # shards still unscanned, but under load the other worker may have scanned them all by
        # then (the rerun then goes straight to the global step).
        assert 0 < len(done) <= 10 if point != "finalize" else len(done) == 10
        rerun = curate_cli(*args)
        assert "527 samples in 9 shards" in rerun.stdout
        again = outputs(tmp_path / "s") | {f"m/{k}": v for k, v in outputs(tmp_path / "m").items()}
        assert again == reference, point


def test_ranks_under_torchrun_write_the_subset_of_one_process(tmp_path, planted):
    args = [str(planted.train), "--dedup", "exact,near", "--decontaminate", str(planted.eval)]
    curate_cli(*args, "--out", str(tmp_path / "one"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    ranks = curate_cli(*args, "--out", str(tmp_path / "two"), launcher=torchrun)
    # Each rank scanned its half. A rank that finds a shard still unscanned says so and stops;
    # the last to finish writes the subset. Two that finish together both find every shard
    # scanned: the first through the lock writes, the second finds it written. Each rank then
    # prints the subset's summary.
    lines = ranks.stdout.splitlines()
    summary = [line for line in lines if line.startswith("527 samples in 9 shards:")]
    waiting = [line for line in lines if "shards scanned here; the last rank to finish" in line]
    assert len(lines) == 2 and len(summary) >= 1 and len(summary) + len(waiting) == 2, lines
    for name in ("subset.json", "removed.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_training_on_a_subset_equals_training_on_its_materialized_shards(tmp_path, demo_shards):  # noqa: F811
    """Every step trains on the same sample keys, to the same losses."""
    shards, tokenizer = demo_shards
    subset, materialized = tmp_path / "subset", tmp_path / "materialized"
    curate_cli(str(shards), "--out", str(subset), "--dedup", "exact,near",
               "--min-caption-words", "8", "--materialize", str(materialized))  # fmt: skip
    kept = json.loads((subset / "subset.json").read_text())["kept"]
    assert 24 < kept < 96
    common = (
        f"data.tokenizer={tokenizer}", "data.train.synthetic=false", "data.log_sample_keys=true",
        "data.train.shuffle_window=16", "data.train.num_workers=1", "model.text.vocab_size=25",
        "model.image.image_size=32", "train.steps=6", "checkpoint.every_steps=0",
    )  # fmt: skip
    runs = {}
    for name, data in (("on_subset", subset), ("on_shards", materialized)):
        train(tmp_path / name, f"data.train.shards={data}", *common, nproc=1)
        runs[name] = sample_log(tmp_path / name)
    assert runs["on_subset"] == runs["on_shards"] and sorted(runs["on_subset"]) == list(range(1, 7))
    assert scalars(tmp_path / "on_subset", "loss/total") == scalars(tmp_path / "on_shards", "loss/total")  # fmt: skip


OPEN_CLIP_SCRIPT = textwrap.dedent(
    """
    import json, sys, types
    # Beside torch 2.13 the only torchvision wheels here register C++ ops that do not load;
    # CLIP's forward uses none of them: import torchvision without those registrations.
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("meta")
    import open_clip, torch
    from PIL import Image
    import io
    from data_pipeline.curate.options import CurateOptions
    from data_pipeline.curate.run import curate
    from data_pipeline.loader.stream import iter_raw_samples

    shards, out, checkpoint = sys.argv[1:4]
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    torch.save({k: v for k, v in model.state_dict().items()}, checkpoint)
    curate(CurateOptions([shards], out, model=f"open_clip:ViT-S-32:{checkpoint}", keep_top=0.5))
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None)
    tokenizer = open_clip.get_tokenizer("ViT-S-32")
    samples = list(iter_raw_samples(shards))
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(tokenizer([s.text for s in samples]), normalize=True)
    print(json.dumps({"keys": [s.key for s in samples], "scores": (image * text).sum(-1).tolist()}))
    """
)


def test_open_clip_scorer_with_a_randomly_initialised_model(tmp_path):
    """`--model open_clip:ARCH:CHECKPOINT` scores as open_clip's own encoders do. open_clip is not
    a dependency (its torchvision does not install beside torch 2.13 without breaking
    transformers' ViT import): set UMT_OPEN_CLIP_SITE to a folder it is installed in
    (`pip install --target DIR --no-deps open_clip_torch torchvision timm ftfy wcwidth`)."""
    site = os.environ.get("UMT_OPEN_CLIP_SITE")
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), site]))}
    found = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('open_clip') is not None)"], env=env, capture_output=True, text=True)  # fmt: skip
    if found.stdout.strip() != "True":
        pytest.skip("open_clip is not installed (set UMT_OPEN_CLIP_SITE)")
    from tests.data_pipeline.curate_cases import plant_swapped

    plant_swapped(tmp_path / "scenes", count=8, swapped=2, side=64)
    proc = subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_SCRIPT, str(tmp_path / "scenes"), str(tmp_path / "s"),
         str(tmp_path / "random.pt")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    direct = json.loads(proc.stdout.strip().splitlines()[-1])
    order = sorted(range(8), key=lambda i: -direct["scores"][i])
    kept = {direct["keys"][i] for i in order[:4]}
    removed = [json.loads(line) for line in (tmp_path / "s" / "removed.jsonl").read_text().splitlines()]  # fmt: skip
    assert {r["key"] for r in removed} == set(direct["keys"]) - kept
    for r in removed:
        want = direct["scores"][direct["keys"].index(r["key"])]
        assert abs(r["evidence"]["score"] - want) < 1e-5


def test_shards_in_object_storage_curate_to_the_local_subset(tmp_path):
    """The same shards read from S3 (moto) and over HTTP (nginx): the same samples removed for
    the same reasons and kept, and the remote subsets deal the same global order."""
    from data_pipeline.curate.options import CurateOptions
    from data_pipeline.curate.run import curate
    from launch.data import main as data_main
    from tests.storage_servers import moto_s3, nginx

    planted = plant(tmp_path / "planted", scene_count=8, eval_scene_count=4)
    rules = {"dedup": ("exact", "near"), "cache_dir": str(tmp_path / "cache")}

    def decided(source: str, out: str) -> tuple[list, list]:
        summary = curate(CurateOptions([source], str(tmp_path / out), **rules))
        removed = [(r["key"], r["reason"]) for r in read_removed(tmp_path / out)]
        assert summary.kept and removed
        return removed, [s["kept"] for s in json.loads((tmp_path / out / "subset.json").read_text())["shards"]]  # fmt: skip

    def order(subset: str) -> str:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert data_main(["order", subset, "--batch-size", "8", "--global", "--sample-keys",
                              "--steps", "5", "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
        return buffer.getvalue()

    want, local_order = decided(str(planted.train), "local"), order(str(tmp_path / "local"))
    assert local_order.count("\n") == 5
    with moto_s3() as s3:
        url = s3.upload_folder(planted.train, "planted/train")
        assert decided(url, "s3") == want and order(str(tmp_path / "s3")) == local_order
    with nginx(planted.train.parent, tmp_path / "nginx") as http:
        assert decided(f"{http.base}/train/", "http") == want
        assert order(str(tmp_path / "http")) == local_order
