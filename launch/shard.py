"""`umt shard`: image-text collections to WebDataset shards; `umt shard merge` joins parts."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping

from data_pipeline.shard import (
    IMAGE_FORMATS,
    PER_MODES,
    RESAMPLE_FILTERS,
    RESIZE_MODES,
    ShardError,
    ShardOptions,
    ShardSummary,
    merge_parts,
    shard_dataset,
)
from data_pipeline.shard.sources import FORMATS, SPLITS, SourceError
from data_pipeline.storage import StorageError

EXAMPLES = """examples:
  umt shard pairs.csv --out shards/ --workers 8
  umt shard annotations/captions_train2017.json --image-root train2017 --per caption --out coco/
  umt shard dataset_coco.json --split test --image-root /data/coco --out coco-test/
  umt shard urls.parquet --image-col url --caption-col text --maxsize 1GB --out web/
  sbatch --array=0-15 ...  umt shard big.parquet --out web/   (parts from SLURM_ARRAY_*)
  umt shard merge web/ --out web/
  umt shard pairs.parquet --out s3://bucket/shards/web   (AWS settings from the environment)

Run the same command again after an interruption: finished shards are kept, the rest redone."""

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_bytes(text: str) -> int:
    """`123`, `500MB`, `1.5GiB` -> bytes (k/M/G are powers of 1000, Ki/Mi/Gi of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (try 1000000 or 1GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def parse_columns(text: str) -> tuple[str, ...]:
    """`a,b` -> ("a", "b"); empty names and repeats are errors."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"not a list of distinct column names: {text!r}")
    return names


def slurm_part_defaults(environ: Mapping[str, str]) -> tuple[int, int]:
    """(num_parts, part_index) of a Slurm job array task, or (1, 0) outside one."""
    count = environ.get("SLURM_ARRAY_TASK_COUNT")
    task = environ.get("SLURM_ARRAY_TASK_ID")
    if not count or not task:
        return 1, 0
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))  # arrays may be numbered from 1
    return int(count), int(task) - first


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    num_parts, part_index = slurm_part_defaults(environ)
    defaults = ShardOptions()
    parser = argparse.ArgumentParser(
        prog="umt shard",
        description="Turn image-text pairs into WebDataset shards plus manifest.json, "
        "sizes.json and errors.jsonl, in parallel and resumably. "
        "`umt shard merge PART_DIRS... --out DIR` joins the parts of a sliced run.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input", help="CSV/TSV/JSONL/Parquet table, COCO or Karpathy JSON, or a folder"
    )
    parser.add_argument(
        "--out", required=True, help="output folder, or s3://bucket/prefix (S3 or compatible)"
    )
    parser.add_argument(
        "--staging",
        help="with --out s3://...: local folder shards are written in before they are published "
        "(default $TMPDIR/umt-shard-staging/<hash of the URL>)",
    )
    parser.add_argument("--format-in", choices=FORMATS, help="input format (default: detected)")

    source = parser.add_argument_group("input")
    source.add_argument(
        "--image-col", help="table column with image paths/URLs (default: image, url, ...)"
    )
    source.add_argument(
        "--caption-col", help="table column with captions (default: caption, text, ...)"
    )
    source.add_argument(
        "--save-additional-columns",
        type=parse_columns,
        default=(),
        metavar="COL,COL",
        help="table columns copied into each sample's json (img2dataset's option of that name)",
    )
    source.add_argument(
        "--image-root",
        help="folder that relative image paths start from (default: the input's folder)",
    )
    source.add_argument(
        "--split",
        choices=SPLITS,
        default=defaults.split,
        help="Karpathy split (restval counts as train)",
    )
    source.add_argument(
        "--per",
        choices=PER_MODES,
        default=defaults.per,
        help="one sample per image (all captions in .json) or per caption",
    )

    image = parser.add_argument_group("images")
    image.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default=defaults.resize,
        help="keep_ratio: short side to --image-size; center_crop: that, then the centre square; "
        "border: long side to --image-size, padded square; none: as is. Smaller images are "
        "enlarged (bicubic) unless --no-upscale",
    )
    image.add_argument("--image-size", type=int, default=defaults.image_size, help="pixels")
    image.add_argument(
        "--no-upscale",
        action="store_true",
        help="keep images smaller than --image-size at their size (center_crop: a smaller square)",
    )
    image.add_argument(
        "--resample",
        choices=list(RESAMPLE_FILTERS),
        default=defaults.resample,
        help="downscaling filter (area is img2dataset's INTER_AREA)",
    )
    image.add_argument(
        "--format", dest="image_format", choices=list(IMAGE_FORMATS), default=defaults.image_format
    )
    image.add_argument("--quality", type=int, default=defaults.quality, help="jpg/webp quality")
    image.add_argument(
        "--skip-reencode",
        action="store_true",
        help="copy images already in the target format and size",
    )
    image.add_argument(
        "--min-size",
        type=int,
        default=defaults.min_size,
        help="reject images whose short side is smaller",
    )
    image.add_argument(
        "--max-aspect-ratio", type=float, help="reject images with long/short side above this"
    )
    image.add_argument(
        "--max-pixels",
        type=int,
        default=defaults.max_pixels,
        help="decompression-bomb guard (width*height)",
    )

    shards = parser.add_argument_group("shards")
    shards.add_argument("--maxcount", type=int, default=defaults.maxcount, help="samples per shard")
    shards.add_argument(
        "--maxsize", type=parse_bytes, help="bytes per shard (e.g. 1GB); full shards close early"
    )
    shards.add_argument("--seed", type=int, help="shuffle rows with this seed before sharding")
    shards.add_argument(
        "--prefix", default=defaults.prefix, help="shard names are PREFIX-000000.tar, ..."
    )

    network = parser.add_argument_group("downloads")
    network.add_argument(
        "--timeout", dest="timeout_s", type=float, default=defaults.timeout_s, help="seconds"
    )
    network.add_argument(
        "--download-deadline",
        dest="download_deadline_s",
        type=float,
        default=defaults.download_deadline_s,
        help="seconds a whole download may take (--timeout bounds each read)",
    )
    network.add_argument("--retries", type=int, default=defaults.retries)
    network.add_argument(
        "--max-download-size",
        dest="max_download_bytes",
        type=parse_bytes,
        default=defaults.max_download_bytes,
    )
    network.add_argument(
        "--download-threads", type=int, default=defaults.download_threads, help="per worker"
    )

    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, default=defaults.workers, help="processes")
    run.add_argument(
        "--num-parts",
        type=int,
        default=num_parts,
        help="slices of the work (default: SLURM_ARRAY_TASK_COUNT or 1)",
    )
    run.add_argument(
        "--part-index",
        type=int,
        default=part_index,
        help="this slice (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="delete a previous run's output and start over"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umt shard merge",
        description="Join the part manifests of `umt shard --num-parts P` into one manifest.json, "
        "sizes.json and errors.jsonl.",
    )
    parser.add_argument(
        "parts", nargs="+", help="part output folders or manifest-part-*.json files"
    )
    parser.add_argument("--out", required=True, help="folder for the merged manifest")
    return parser


def options_from_args(args: argparse.Namespace) -> ShardOptions:
    names = ShardOptions.__dataclass_fields__
    return ShardOptions(**{name: value for name, value in vars(args).items() if name in names})


def run_shard(argv: list[str]) -> ShardSummary:
    args = build_parser(os.environ).parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    return shard_dataset(args.input, args.out, options_from_args(args), progress=progress)


def run_merge(argv: list[str]) -> ShardSummary:
    args = build_merge_parser().parse_args(argv)
    return merge_parts(args.parts, args.out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        summary = run_merge(argv[1:]) if argv[:1] == ["merge"] else run_shard(argv)
    except (ShardError, SourceError) as exc:
        print(f"umt shard: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"umt shard: error: {exc}; run the same command again to resume", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a folder that became unwritable: nothing is lost
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"umt shard: error: {where}{exc.strerror or exc}; fix that, then run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("umt shard: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary.line())
    if summary.rows and not summary.written:
        print("umt shard: error: every row failed; see errors.jsonl for why", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
