"""`umt data curate SHARDS --out SUBSET`: deduplicate, decontaminate and filter shards into a
subset (a view over them that every command taking shards reads), or new shards."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from data_pipeline.curate.options import (
    DEDUP_MODES,
    NEAR_COLOR,
    NEAR_HAMMING,
    CurateError,
    CurateOptions,
)
from data_pipeline.loader.config import LoaderConfigError
from data_pipeline.storage import StorageError
from data_pipeline.subset import SubsetError

EXAMPLES = """examples:
  umt data curate shards/cc --out subsets/cc-dedup --dedup exact,near --workers 8
  umt data curate shards/cc --out subsets/cc-clean --dedup exact --decontaminate shards/coco_test
  umt data curate shards/cc --out subsets/cc-top30 --dedup exact --model exports/umt-base \\
      --keep-top 0.3 --table subsets/cc-dedup/table      (hashes reused: nothing recomputed)
  umt data curate shards/cc --out s --model open_clip:ViT-L-14:vitl14.pt --min-similarity 0.28
  umt data curate shards/cc --out s --dedup exact --materialize shards/cc-dedup
  torchrun --nproc_per_node 4 -m launch.cli data curate shards/cc --out s --dedup near
  umt submit curate shards/cc --out s --nodes 2 --tasks-per-node 4 -- --dedup exact,near

Run the same command again after an interruption: scanned shards are kept, the rest redone."""


def parse_dedup(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in DEDUP_MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"takes exact, near or exact,near (got {text!r})")
    return modes


def rank_defaults(environ: Mapping[str, str]) -> tuple[int, int]:
    """(num_parts, part_index): torchrun's or srun's ranks, a Slurm array task, else (1, 0)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["WORLD_SIZE"]), int(environ["RANK"])
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        return int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"])
    if environ.get("SLURM_ARRAY_TASK_COUNT") and environ.get("SLURM_ARRAY_TASK_ID"):
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(environ["SLURM_ARRAY_TASK_COUNT"]), int(environ["SLURM_ARRAY_TASK_ID"]) - first
    return 1, 0


def add_parser(commands, environ: Mapping[str, str]) -> None:
    """`curate` among the subcommands of `umt data`."""
    num_parts, part_index = rank_defaults(environ)
    p = commands.add_parser(
        "curate",
        help="deduplicate, decontaminate and filter shards into a subset (a view) or new shards",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shards", help="shard folder, brace pattern, subset, or comma-separated specs")
    p.add_argument("--out", required=True, help="the subset folder (subset.json, removed.jsonl)")
    p.add_argument(
        "--dedup", type=parse_dedup, default=(), help="exact (same decoded pixels), near, or both"
    )
    p.add_argument(
        "--near-hamming",
        type=int,
        default=NEAR_HAMMING,
        help=f"near: most differing bits of the 64-bit perceptual hashes (default {NEAR_HAMMING})",
    )
    p.add_argument(
        "--near-color",
        type=float,
        default=NEAR_COLOR,
        help=f"near: largest colour-histogram L1 distance, 0-2 (default {NEAR_COLOR})",
    )
    p.add_argument(
        "--decontaminate",
        nargs="+",
        action="extend",
        default=[],
        metavar="EVAL_SHARDS",
        help="remove samples whose image is a near duplicate of an image of these shards",
    )
    p.add_argument(
        "--decontaminate-captions",
        action="store_true",
        help="also remove samples whose caption equals an evaluation caption",
    )
    p.add_argument("--model", help="scorer: a UMT export folder or open_clip:ARCH:CHECKPOINT")
    p.add_argument("--min-similarity", type=float, help="remove pairs scoring below this")
    p.add_argument("--keep-top", type=float, help="keep this fraction of pairs, by score")
    p.add_argument("--score-batch", type=int, default=32, help="pairs per scorer call")
    p.add_argument(
        "--device",
        default="auto",
        help="scorer device: cpu, cuda (this rank's GPU) or auto (cuda when visible)",
    )
    p.add_argument("--min-caption-words", type=int)
    p.add_argument("--max-caption-words", type=int)
    p.add_argument(
        "--table",
        help="per-shard hash and score tables to reuse and add to (default OUT/table); "
        "another subset's table makes a run with other thresholds recompute nothing",
    )
    p.add_argument("--materialize", metavar="DIR", help="also write the kept samples as shards")
    p.add_argument("--workers", type=int, default=1, help="processes on this node")
    p.add_argument("--num-parts", type=int, default=num_parts, help="ranks splitting the shards")
    p.add_argument("--part-index", type=int, default=part_index, help="this rank")
    p.add_argument("--cache-dir", help="node-local folder for copies of remote shards")
    p.add_argument("--overwrite", action="store_true", help="start --out over (its table is kept)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> CurateOptions:
    return CurateOptions(
        sources=[args.shards],
        out=args.out,
        dedup=args.dedup,
        near_hamming=args.near_hamming,
        near_color=args.near_color,
        decontaminate=list(args.decontaminate),
        decontaminate_captions=args.decontaminate_captions,
        model=args.model,
        min_similarity=args.min_similarity,
        keep_top=args.keep_top,
        min_caption_words=args.min_caption_words,
        max_caption_words=args.max_caption_words,
        table=args.table,
        materialize=args.materialize,
        workers=args.workers,
        part_index=args.part_index,
        num_parts=args.num_parts,
        score_batch=args.score_batch,
        device=args.device,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def run(args: argparse.Namespace) -> int:
    from data_pipeline.curate.run import curate

    try:
        summary = curate(options_from_args(args))
    except (CurateError, LoaderConfigError, SubsetError) as exc:
        print(f"umt data curate: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(
            f"umt data curate: error: {exc}; run the same command again to resume", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print("umt data curate: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary.line())
    return 0
