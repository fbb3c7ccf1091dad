"""`umt data`: inspect shards (counts, a few samples) and print the batch order a rank's loader yields.

`umt data order` builds the training loader itself (same plan, split, shuffle, workers and
resume rule) with image decoding switched off, so it prints what training sees, fast. Pass
`--decode` when the shards may hold corrupt images: training skips those and refills the batch,
which only decoding can reproduce.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from collections import Counter

from data_pipeline.loader import (
    LoaderConfig,
    LoaderConfigError,
    build_loader,
    iter_raw_samples,
    resolve_sources,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umt data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="print sample counts and show a few samples")
    inspect.add_argument("shards", help="shard folder, brace pattern, or comma-separated specs")
    inspect.add_argument("--samples", type=int, default=3, help="samples to show (default 3)")

    order = commands.add_parser("order", help="print, one line per batch, the keys a rank yields")
    order.add_argument("shards", help="shard folder, brace pattern, or `name=spec:weight,...`")
    order.add_argument("--rank", type=int, default=0, help="which rank's batches (default 0)")
    order.add_argument("--world-size", type=int, default=1, help="ranks in the run (default 1)")
    order.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    order.add_argument("--batch-size", type=int, required=True)
    order.add_argument("--seed", type=int, default=0, help="the run's data seed (default 0)")
    order.add_argument("--epoch", type=int, default=0, help="epoch to start in (default 0)")
    order.add_argument("--resampled", action="store_true", help="draw shards with replacement")
    order.add_argument("--shuffle-buffer", type=int, default=LoaderConfig.shuffle_buffer)
    order.add_argument("--on-uneven", choices=("pad", "drop"), default=LoaderConfig.on_uneven)
    order.add_argument(
        "--start-batch", type=int, default=0, help="first batch, counted from the start of --epoch"
    )
    order.add_argument(
        "--batches", type=int, default=None, help="how many batches (default: to the epoch's end)"
    )
    order.add_argument(
        "--sample-keys", action="store_true", help="print sample keys instead of image keys"
    )
    order.add_argument(
        "--decode", action="store_true", help="decode images, to mirror skips of corrupt ones"
    )
    return parser


def inspect_shards(args: argparse.Namespace, out: io.TextIOBase) -> int:
    """Counts per source (from the manifests) and the first few samples in stored order."""
    from PIL import Image  # only inspect looks at image headers

    sources = resolve_sources(args.shards, resampled=True)
    for source in sources:
        print(
            f"source {source.name}: {len(source.shards)} shards, {source.total_samples} samples "
            f"(weight {source.weight:g})",
            file=out,
        )
    print(f"total: {sum(s.total_samples for s in sources)} samples", file=out)
    errors: Counter = Counter()
    for sample in itertools.islice(iter_raw_samples(args.shards, errors), args.samples):
        try:
            width, height = Image.open(io.BytesIO(sample.image)).size
            size = f"{width}x{height}"
        except Exception:
            size = "undecodable"
        print(
            f"  {sample.key}  image_key={sample.image_key}  image={size} "
            f"({len(sample.image)} bytes)  captions={len(sample.captions)}  {sample.text!r}",
            file=out,
        )
    if errors:
        print(f"skipped while reading: {dict(errors)}", file=out)
    return 0


def print_order(args: argparse.Namespace, out: io.TextIOBase) -> int:
    """`epoch<TAB>batch<TAB>key key ...` per batch, from rank R's real loader."""
    cfg = LoaderConfig(
        shards=args.shards,
        batch_size=args.batch_size,
        num_workers=args.workers,
        seed=args.seed,
        resampled=args.resampled,
        shuffle_buffer=args.shuffle_buffer,
        on_uneven=args.on_uneven,
        tokenizer=None,
        decode_images=args.decode,
        persistent_workers=True,
    )
    loader = build_loader(cfg, args.rank, args.world_size, epoch=args.epoch)
    start = args.start_batch
    count = args.batches
    if count is None:
        count = loader.batches_per_epoch - start % loader.batches_per_epoch
    if args.decode:  # skipped corrupt images shift positions: replay instead of seeking
        batches = itertools.islice(iter(loader), start, None)
    else:
        loader.skip_to(start)
        batches = iter(loader)
    for batch in itertools.islice(batches, count):
        keys = batch.keys if args.sample_keys else batch.image_keys
        print(f"{batch.epoch}\t{batch.index}\t{' '.join(keys)}", file=out, flush=False)
    out.flush()
    if loader.error_counts():
        print(f"skipped: {loader.error_counts()}", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return inspect_shards(args, sys.stdout)
        return print_order(args, sys.stdout)
    except LoaderConfigError as exc:
        print(f"umt data {args.command}: {exc}", file=sys.stderr)
        return 2
