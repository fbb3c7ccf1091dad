"""Images/s of `umt shard` (2 workers) against a single-process PIL + webdataset.ShardWriter loop.

Both do the same work on the same JPEGs: decode, resize so the short side is 256 (keep ratio),
encode JPEG quality 95, write WebDataset shards with a caption and a JSON record per sample.
Two inputs: 640x480 photos (the issue's case) and 480x480 (the case img2dataset was quoted on:
"about 700 images/s with OpenCV and 2 processes" on the 2-core development machine).

When an `img2dataset` executable is found (on PATH, or `--img2dataset PATH`; it is not one of our
dependencies: install it in a separate venv), it runs as a third contender on the same files
(read as file:// URLs, 2 processes, keep_ratio 256, webdataset output); its figure is the one it
reports itself, which leaves out its start-up, so the comparison favours it.

    python benchmarks/shard_throughput.py [--quick] [--images N] [--workers 2] [--img2dataset P]

Ends with one line `SUMMARY key=value ...`.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import random
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageFilter

from data_pipeline.shard import ShardOptions, shard_dataset

IMG2DATASET_480_IPS = 700.0  # the quote for img2dataset, 2 processes, 480x480 -> 256


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


def run_umt(table: Path, out: Path, image_size: int, workers: int, resample: str) -> float:
    # 200 per shard: 10 shards for 2000 images, so both workers have whole shards to write.
    options = ShardOptions(
        resize="keep_ratio",
        image_size=image_size,
        resample=resample,
        quality=95,
        workers=workers,
        maxcount=200,
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
    repeats: int,
    img2dataset: str | None,
) -> dict:
    """Best-of-`repeats` images/s of each contender, runs interleaved (the machine is shared)."""
    table = make_dataset(root / name, count, size)
    mean_kb = sum(p.stat().st_size for p in table.parent.glob("*.jpg")) / count / 1024
    best = {"baseline": 0.0, "umt_area": 0.0, "umt_bicubic": 0.0}
    cpu_ms = {label: float("inf") for label in best}
    for rep in range(repeats):
        runs = {
            "baseline": lambda out: run_baseline(table, out, 256),
            "umt_area": lambda out: run_umt(table, out, 256, workers, "area"),
            "umt_bicubic": lambda out: run_umt(table, out, 256, workers, "bicubic"),
        }
        for label, run in runs.items():
            out = root / f"{name}-{label}-{rep}"
            cpu_before = cpu_seconds()
            best[label] = max(best[label], count / run(out))
            cpu_ms[label] = min(cpu_ms[label], (cpu_seconds() - cpu_before) * 1000 / count)
            shutil.rmtree(out)
        if img2dataset:
            out = root / f"{name}-img2dataset-{rep}"
            ips, wall_ips = run_img2dataset(img2dataset, table, out, 256, workers)
            best["img2dataset"] = max(best.get("img2dataset", 0.0), ips)
            best["img2dataset_wall"] = max(best.get("img2dataset_wall", 0.0), wall_ips)
            shutil.rmtree(out)
    cpu = {f"{label}_cpu_ms": value for label, value in cpu_ms.items()}
    return {"case": name, "images": count, "mean_kb": mean_kb, **best, **cpu}


def print_table(results: list[dict], repeats: int, workers: int) -> None:
    print(f"best of {repeats}; umt shard with {workers} workers, baseline in 1 process")
    print("case     images KB/img | images/s: baseline umt-area umt-bicubic | CPU ms/image: "
          "baseline umt-area umt-bicubic | ratio area bicubic")  # fmt: skip
    for r in results:
        print(
            f"{r['case']:<8} {r['images']:>6} {r['mean_kb']:>6.0f} | {r['baseline']:>18.0f} "
            f"{r['umt_area']:>8.0f} {r['umt_bicubic']:>11.0f} | {r['baseline_cpu_ms']:>22.1f} "
            f"{r['umt_area_cpu_ms']:>8.1f} {r['umt_bicubic_cpu_ms']:>11.1f} | "
            f"{r['umt_area'] / r['baseline']:>10.2f} {r['umt_bicubic'] / r['baseline']:>7.2f}"
        )
    for r in results:
        if "img2dataset" in r:
            print(
                f"{r['case']:<8} img2dataset: {r['img2dataset']:.0f} images/s by its own count "
                f"(umt-area / that = {r['umt_area'] / r['img2dataset']:.2f}), "
                f"{r['img2dataset_wall']:.0f} images/s over the whole command with its start-up"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 images, one run each (< 2 min)")
    parser.add_argument(
        "--images", type=int, help="images per case (default 2000, 500 with --quick)"
    )
    parser.add_argument(
        "--repeats", type=int, help="runs per contender, best kept (default 2, 1 quick)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--img2dataset",
        default=shutil.which("img2dataset"),
        help="img2dataset executable to run as a contender (default: the one on PATH, if any)",
    )
    args = parser.parse_args()
    importlib.import_module("webdataset")  # warm: its ~2 s import must not count as baseline time
    count = args.images or (500 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory(prefix="umt-shard-bench-") as tmp:
        results = [
            measure(Path(tmp), "640x480", count, (640, 480), args.workers, repeats, None),
            measure(
                Path(tmp), "480x480", count, (480, 480), args.workers, repeats, args.img2dataset
            ),
        ]
    print_table(results, repeats, args.workers)
    wide, square = results
    print(
        "SUMMARY "
        f"images={count} workers={args.workers} repeats={repeats} "
        f"umt_640x480_ips={wide['umt_area']:.0f} baseline_640x480_ips={wide['baseline']:.0f} "
        f"ratio_640x480={wide['umt_area'] / wide['baseline']:.2f} "
        f"ratio_640x480_same_filter={wide['umt_bicubic'] / wide['baseline']:.2f} "
        f"umt_480x480_ips={square['umt_area']:.0f} baseline_480x480_ips={square['baseline']:.0f} "
        f"ratio_480x480={square['umt_area'] / square['baseline']:.2f} "
        f"ratio_vs_img2dataset_quote_480x480={square['umt_area'] / IMG2DATASET_480_IPS:.2f}"
        + (
            f" img2dataset_480x480_ips={square['img2dataset']:.0f} "
            f"ratio_vs_img2dataset_480x480={square['umt_area'] / square['img2dataset']:.2f} "
            f"img2dataset_480x480_wall_ips={square['img2dataset_wall']:.0f}"
            if "img2dataset" in square
            else ""
        )
    )


if __name__ == "__main__":
    main()
