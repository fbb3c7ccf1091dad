"""Images/s of `umt shard` (2 workers) against the CPU floor, a single-process PIL +
webdataset.ShardWriter loop, and img2dataset.

Every contender does the same work on the same JPEGs: decode, resize so the short side is 256
(keep ratio), encode JPEG quality 95; all but the floor also write WebDataset shards with a
caption and a JSON record per sample. Two inputs: 640x480 photos and 480x480.

The floor is decode + resize + encode alone, in one process, with `umt shard`'s settings (its
"area" filter): `shard_vs_floor` is `umt shard`'s CPU time per image (parent and workers, start-up
included) over the floor's; `shard_vs_floor_wall` the same with wall time x processes (idle
workers count). Goal: <= 1.3.

When an `img2dataset` executable is found (on PATH, in the tests' cached venv that
tests/side_venvs.py makes for it, or `--img2dataset PATH`; it pins an old webdataset, so it lives
in a venv of its own), it runs on the 480x480 files (read as file:// URLs, 2 processes,
keep_ratio 256, webdataset output); its figure is the one it reports itself, which leaves out its
start-up, so `shard_vs_img2dataset` (goal >= 3) favours it; `shard_vs_img2dataset_wall` and
`_cpu` compare its whole command (images/s, CPU per image) with ours.

One warm-up round, then rounds with the contenders' order rotated; medians and the spread of the
per-round ratios are printed. `umt_again` is a second run of `umt_area`: `shard_again` (ideally
1.00) says how far apart two identical contenders land on this machine.

    python benchmarks/shard_throughput.py [--quick] [--images N] [--rounds R] [--workers 2]

Ends with one line `SUMMARY key=value ...`.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's data_pipeline, not an installed one

from data_pipeline.shard import ShardOptions, shard_dataset  # noqa: E402
from data_pipeline.shard.options import RESAMPLE_FILTERS  # noqa: E402


def photo_like(width: int, height: int, rng: random.Random) -> Image.Image:
    """Smooth colour fields plus fine grain: JPEG sizes and decode costs close to real photos."""
    coarse = Image.frombytes("RGB", (16, 12), rng.randbytes(16 * 12 * 3))
    image = coarse.resize((width, height), Image.Resampling.BICUBIC)
    grain = Image.frombytes("L", (width, height), rng.randbytes(width * height))
    grain = grain.filter(ImageFilter.GaussianBlur(0.7)).convert("RGB")
    return Image.blend(image, grain, 0.15)


def make_dataset(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`count` distinct JPEGs (quality 90) and a CSV with a caption for each."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    bases = [photo_like(*size, rng) for _ in range(16)]
    rows = []
    for i in range(count):
        # Variations of a few generated bases (flips, brightness): distinct files, photo-like
        # content, without generating 2000 photos.
        image = bases[i % len(bases)]
        if i // len(bases) % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.point(lambda v, shift=i // 32 % 24: min(255, v + shift))
        image.save(folder / f"{i:05d}.jpg", quality=90)
        rows.append((f"{i:05d}.jpg", f"a generated photo number {i}"))
    table = folder / "pairs.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return table


def run_baseline(table: Path, out: Path, image_size: int) -> float:
    """The straightforward way: one process, full decode, PIL resize, ShardWriter. Seconds."""
    # Imported here: spawned sharding workers re-import this module, and webdataset takes ~2 s.
    import webdataset as wds

    out.mkdir()
    start = time.perf_counter()
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with wds.ShardWriter(str(out / "base-%06d.tar"), maxcount=10_000, verbose=0) as sink:
        for index, row in enumerate(rows):
            with Image.open(table.parent / row["image"]) as image:
                image = image.convert("RGB")
                w, h = image.size
                scale = image_size / min(w, h)
                image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=95)
            meta = {"caption": row["caption"], "width": image.width, "height": image.height}
            sink.write(
                {
                    "__key__": f"{index:09d}",
                    "jpg": buffer.getvalue(),
                    "txt": row["caption"],
                    "json": json.dumps(meta),
                }
            )
    return time.perf_counter() - start


def run_floor(table: Path, image_size: int, resample: str) -> float:
    """The CPU floor: decode, resize and encode every image, nothing else, in one process, with
    `umt shard`'s settings (keep_ratio, the same filter, quality 95). Seconds; the files are read
    before the clock starts."""
    with open(table, newline="") as handle:
        blobs = [(table.parent / row["image"]).read_bytes() for row in csv.DictReader(handle)]
    resample_filter = RESAMPLE_FILTERS[resample]
    start = time.perf_counter()
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()  # convert("RGB") would copy an RGB image: ~1 ms more here
            pixels = image if image.mode == "RGB" else image.convert("RGB")
            w, h = pixels.size
            scale = image_size / min(w, h)
            pixels = pixels.resize((round(w * scale), round(h * scale)), resample_filter)
            pixels.save(io.BytesIO(), "JPEG", quality=95)
    return time.perf_counter() - start


def shard_size(count: int, workers: int) -> int:
    """Samples per shard: the same whole number of shards for each worker (5 of 200 for 2000
    images on 2 workers, 1 of 250 for 500), so that no worker is left idle while another
    finishes a last shard alone, and shards of at least 200 where there are images enough."""
    per_worker = max(1, min(5, count // (200 * workers)))
    return -(-count // (per_worker * workers))


def run_umt(table: Path, out: Path, image_size: int, workers: int, resample: str) -> float:
    count = sum(1 for _ in table.parent.glob("*.jpg"))
    options = ShardOptions(
        resize="keep_ratio",
        image_size=image_size,
        resample=resample,
        quality=95,
        workers=workers,
        maxcount=shard_size(count, workers),
    )
    start = time.perf_counter()
    summary = shard_dataset(table, out, options)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise RuntimeError(f"benchmark rows failed: {summary.line()}")
    return seconds


def run_img2dataset(
    executable: str, table: Path, out: Path, image_size: int, workers: int
) -> tuple[float, float]:
    """img2dataset on the same files: (images/s by its own count, images/s of the whole command)."""
    urls = table.with_name("urls.csv")
    with open(table, newline="") as source, open(urls, "w", newline="") as target:
        rows = [
            ((table.parent / r["image"]).resolve().as_uri(), r["caption"])
            for r in csv.DictReader(source)
        ]
        csv.writer(target).writerows([("url", "caption"), *rows])
    cmd = [
        executable, "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
        "--caption_col", "caption", "--output_folder", str(out), "--output_format", "webdataset",
        "--processes_count", str(workers), "--thread_count", "4", "--image_size", str(image_size),
        "--resize_mode", "keep_ratio", "--encode_quality", "95", "--number_sample_per_shard",
        "200", "--enable_wandb", "False",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = re.findall(r"^total\b.*success: ([\d.]+).*images per sec: (\d+)", proc.stdout, re.M)
    if proc.returncode != 0 or not found or float(found[-1][0]) != 1.0:
        raise RuntimeError(f"img2dataset failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return float(found[-1][1]), len(rows) / wall


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: robust to other users' load."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(
    root: Path,
    name: str,
    count: int,
    size: tuple[int, int],
    workers: int,
    rounds: int,
    img2dataset: str | None,
) -> dict:
    """Wall and CPU seconds of each contender per round: one warm-up round, then `rounds`
    rounds, the contenders' order rotated each round (the machine is shared: paired ratios)."""
    table = make_dataset(root / name, count, size)
    mean_kb = sum(p.stat().st_size for p in table.parent.glob("*.jpg")) / count / 1024
    runs = {
        "floor": lambda out: run_floor(table, 256, "area"),
        "baseline": lambda out: run_baseline(table, out, 256),
        "umt_area": lambda out: run_umt(table, out, 256, workers, "area"),
        "umt_bicubic": lambda out: run_umt(table, out, 256, workers, "bicubic"),
        "umt_again": lambda out: run_umt(table, out, 256, workers, "area"),  # the noise floor
    }
    if img2dataset:
        runs["img2dataset"] = lambda out: run_img2dataset(img2dataset, table, out, 256, workers)
    measured: dict[str, list[dict]] = {label: [] for label in runs}
    labels = list(runs)
    for rep in range(rounds + 1):
        for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:
            out = root / f"{name}-{label}-{rep}"
            cpu_before = cpu_seconds()
            result = runs[label](out)
            cpu = cpu_seconds() - cpu_before
            shutil.rmtree(out, ignore_errors=True)
            if rep == 0:
                continue  # warm-up: page cache, imports, the first spawn
            if label == "img2dataset":
                own_ips, wall_ips = result
                measured[label].append(
                    {"ips": own_ips, "wall_ips": wall_ips, "cpu_ms": cpu * 1000 / count}
                )
            else:
                seconds = result
                processes = workers if label.startswith("umt") else 1
                measured[label].append(
                    {
                        "ips": count / seconds,
                        "cpu_ms": cpu * 1000 / count,
                        "process_ms": seconds * processes * 1000 / count,
                    }
                )
    return {"case": name, "images": count, "mean_kb": mean_kb, "runs": measured}


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired(result: dict, ratio) -> tuple[float, float, float]:
    """Median, min and max over rounds of `ratio(round's measurements by label)`."""
    runs = result["runs"]
    values = [ratio({label: runs[label][i] for label in runs}) for i in range(len(runs["floor"]))]
    return median(values), min(values), max(values)


def ratios(result: dict) -> dict[str, tuple[float, float, float]]:
    found = {
        # per image and per process: umt's CPU (parent and workers, start-up included) and the
        # wall time of its workers, against the floor's one process
        "shard_vs_floor": paired(result, lambda r: r["umt_area"]["cpu_ms"] / r["floor"]["cpu_ms"]),
        "shard_vs_floor_wall": paired(
            result, lambda r: r["umt_area"]["process_ms"] / r["floor"]["process_ms"]
        ),
        "shard_vs_baseline": paired(result, lambda r: r["umt_area"]["ips"] / r["baseline"]["ips"]),
        "same_filter_vs_baseline": paired(
            result, lambda r: r["umt_bicubic"]["ips"] / r["baseline"]["ips"]
        ),
    }
    if "img2dataset" in result["runs"]:
        found["shard_vs_img2dataset"] = paired(
            result, lambda r: r["umt_area"]["ips"] / r["img2dataset"]["ips"]
        )
        # img2dataset's whole command (start-up included) against ours: images/s and CPU
        found["shard_vs_img2dataset_wall"] = paired(
            result, lambda r: r["umt_area"]["ips"] / r["img2dataset"]["wall_ips"]
        )
        found["shard_vs_img2dataset_cpu"] = paired(
            result, lambda r: r["img2dataset"]["cpu_ms"] / r["umt_area"]["cpu_ms"]
        )
    # two runs of the same thing: how far apart identical contenders land on this machine
    found["shard_again"] = paired(result, lambda r: r["umt_area"]["ips"] / r["umt_again"]["ips"])
    return found


def print_table(results: list[dict], rounds: int, workers: int) -> None:
    print(
        f"median of {rounds} rounds after a warm-up, order rotated; umt shard and img2dataset "
        f"with {workers} processes, floor and baseline in 1"
    )
    print("case     contender     images/s  CPU ms/image  ms/image/process")
    for r in results:
        for label, runs in r["runs"].items():
            ips = median([m["ips"] for m in runs])
            cpu = median([m["cpu_ms"] for m in runs])
            per_process = (
                f"{median([m['process_ms'] for m in runs]):>17.2f}"
                if "process_ms" in runs[0]
                else ""
            )
            print(f"{r['case']:<8} {label:<12} {ips:>9.0f} {cpu:>13.2f} {per_process}")
        for key, (mid, low, high) in ratios(r).items():
            print(f"{r['case']:<8} {key}: {mid:.2f} (rounds {low:.2f}-{high:.2f})")
        if "img2dataset" in r["runs"]:
            wall_ips = median([m["wall_ips"] for m in r["runs"]["img2dataset"]])
            print(
                f"{r['case']:<8} img2dataset's images/s is its own count; over its whole "
                f"command, start-up included: {wall_ips:.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 images, 1 round (< 2 min)")
    parser.add_argument(
        "--images", type=int, help="images per case (default 2000, 500 with --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, help="measured rounds after the warm-up (default 3, 1 quick)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--img2dataset",
        default=find_img2dataset(),
        help="img2dataset executable to run as a contender (default: on PATH, or the one the "
        "tests' cached venv holds)",
    )
    args = parser.parse_args()
    importlib.import_module("webdataset")  # warm: its ~2 s import must not count as baseline time
    count = args.images or (500 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    if not args.img2dataset:
        print("img2dataset left out: not on PATH and not in the tests' venv cache (--img2dataset)")
    with tempfile.TemporaryDirectory(prefix="umt-shard-bench-") as tmp:
        results = [
            measure(Path(tmp), "640x480", count, (640, 480), args.workers, rounds, None),
            measure(
                Path(tmp), "480x480", count, (480, 480), args.workers, rounds, args.img2dataset
            ),
        ]
    print_table(results, rounds, args.workers)
    fields = [f"images={count} workers={args.workers} rounds={rounds}"]
    for r in results:
        case = r["case"]
        fields.append(f"umt_{case}_ips={median([m['ips'] for m in r['runs']['umt_area']]):.0f}")
        fields.append(
            f"floor_{case}_cpu_ms={median([m['cpu_ms'] for m in r['runs']['floor']]):.2f}"
        )
        fields += [f"{key}_{case}={mid:.2f}" for key, (mid, _, _) in ratios(r).items()]
    wide, square = (ratios(r) for r in results)
    fields.append(
        f"shard_vs_floor={max(wide['shard_vs_floor'][0], square['shard_vs_floor'][0]):.2f}"
    )
    if "shard_vs_img2dataset" in square:
        fields.append(f"shard_vs_img2dataset={square['shard_vs_img2dataset'][0]:.2f}")
    print("SUMMARY " + " ".join(fields))


def find_img2dataset() -> str | None:
    """img2dataset on PATH, else the one tests/side_venvs.py's cache holds (it needs a venv of
    its own: it pins an old webdataset)."""
    found = shutil.which("img2dataset")
    if found:
        return found
    cache = Path(
        os.environ.get("UMT_TEST_VENVS")
        or Path(tempfile.gettempdir()) / f"umt-test-venvs-{os.getuid()}"
    )
    cached = sorted(cache.glob("img2dataset-*/bin/img2dataset"))
    return str(cached[-1]) if cached else None


if __name__ == "__main__":
    main()
