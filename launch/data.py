"""`umt data`: inspect shards, index them, print the sample order training sees, and curate them.

`umt data order` runs the training loader itself (same global order, dealing rule and workers)
with image decoding switched off, so it prints what a rank trains on, fast; `--global` prints
each global step's samples whatever the topology, `--global --counts` each step's samples per
source. Pass `--decode` when the shards may hold corrupt images: training replaces those, which
only decoding can reproduce. `umt data inspect` gives each source's samples in an epoch.
"""

from __future__ import annotations

import argparse
import glob
import io
import itertools
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

from data_pipeline import storage
from data_pipeline.loader import (
    LoaderConfig,
    LoaderConfigError,
    LoaderDataError,
    build_loader,
    iter_raw_samples,
    resolve_dataset,
)
from data_pipeline.loader.dataset import expand_braces
from data_pipeline.loader.order import GlobalOrder
from data_pipeline.loader.specs import parse_source_specs
from data_pipeline.shard.manifest import file_sha256
from data_pipeline.shard_cache import ShardCache, default_cache_dir
from data_pipeline.storage import StorageError
from data_pipeline.subset import counts_by_source, read_subset_if_any, verify_sources
from data_pipeline.tar_index import (
    TarIndexError,
    check_index,
    index_location,
    index_of_file,
    read_index,
    write_index,
    write_json_whole,
)
from launch import curate as curate_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umt data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="print sample counts and show a few samples")
    inspect.add_argument("shards", help="shard folder, brace pattern, or comma-separated specs")
    inspect.add_argument("--samples", type=int, default=3, help="samples to show (default 3)")
    inspect.add_argument(
        "--epoch", type=int, default=0, help="give each source's samples in this epoch (default 0)"
    )
    inspect.add_argument(
        "--seed", type=int, default=0, help="the run's data seed (resampled draws; default 0)"
    )
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="of a subset: recompute every source shard's sha256 against the one recorded",
    )
    add_storage_options(inspect)

    index = commands.add_parser(
        "index",
        help="write the per-shard index (random access) beside shards that lack one, and a "
        "folder's sizes.json (sample counts) when it has no manifest.json",
    )
    index.add_argument("shards", help="a folder of .tar files, a brace pattern, or one .tar")
    index.add_argument("--check", action="store_true", help="check existing indexes, write none")
    index.add_argument("--force", action="store_true", help="rewrite existing indexes too")
    add_storage_options(index)

    order = commands.add_parser("order", help="print the samples a rank (or a step) trains on")
    order.add_argument("shards", help="shard folder, brace pattern, or `name=spec:weight,...`")
    order.add_argument("--batch-size", type=int, required=True, help="micro-batch per rank")
    order.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    order.add_argument("--world-size", type=int, default=1, help="ranks in the run (default 1)")
    order.add_argument("--rank", type=int, default=0, help="which rank's batches (default 0)")
    order.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    order.add_argument("--seed", type=int, default=0, help="the run's data seed (default 0)")
    order.add_argument("--resampled", action="store_true", help="draw shards with replacement")
    order.add_argument("--shuffle-window", type=int, default=LoaderConfig.shuffle_window)
    order.add_argument("--epoch-tail", choices=("carry", "drop"), default=LoaderConfig.epoch_tail)
    order.add_argument("--epoch", type=int, default=0, help="start at this epoch (default 0)")
    order.add_argument(
        "--start-step", type=int, default=0, help="first step, counted from the start of --epoch"
    )
    order.add_argument(
        "--steps", type=int, default=None, help="how many steps (default: to the epoch's end)"
    )
    order.add_argument(
        "--global", dest="global_", action="store_true",
        help="one line per step: the sample keys of the whole global batch, in stream order",
    )  # fmt: skip
    order.add_argument(
        "--counts", action="store_true",
        help="with --global: each step's samples per source (`step<TAB>name=n ...`), then the total",
    )  # fmt: skip
    order.add_argument(
        "--sample-keys", action="store_true", help="print sample keys instead of image keys"
    )
    order.add_argument(
        "--decode", action="store_true", help="decode images, to mirror replaced corrupt ones"
    )
    add_storage_options(order)
    order.add_argument("--cache-limit-gb", type=float, default=0.0, help="0: 90%% of free space")
    order.add_argument("--remote-read", choices=("cache", "range"), default="cache")
    curate_cli.add_parser(commands, os.environ)
    return parser


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        help="node-local folder for copies of s3:// or http(s):// shards "
        "(default $TMPDIR/umt-shard-cache-UID)",
    )


def inspect_shards(args: argparse.Namespace, out: io.TextIOBase) -> int:
    """Counts per source (from the manifests), their samples in epoch --epoch, and the first few
    samples in stored order."""
    from PIL import Image  # only inspect looks at image headers

    resampled = any(s.weight is not None for s in parse_source_specs(args.shards))
    dataset = resolve_dataset(args.shards, resampled)
    cfg = LoaderConfig(shards=args.shards, seed=args.seed, resampled=resampled)
    order = GlobalOrder(dataset, cfg)
    epoch = order.source_counts(order.epoch_start(args.epoch), order.epoch_start(args.epoch + 1))
    problems = []
    for source, share, count in zip(dataset.sources, order.shares, epoch):
        if resampled:
            mix = f"weight {source.weight:g}"
        elif source.proportion is not None:
            mix = f"proportion {source.proportion:g}: {float(share):g} per epoch"
        else:
            mix = f"x{source.repeat or 1:g}: {float(share):g} per epoch"
        print(
            f"source {source.name}: {len(source.shards)} shards, {source.total_samples} samples "
            f"({mix}; {count} in epoch {args.epoch})",
            file=out,
        )
        if source.subset is not None:
            problems += describe_subset(source.subset["subset"], args, out)
    print(
        f"total: {dataset.total_samples} samples; epoch {args.epoch}: {int(epoch.sum())}", file=out
    )
    errors: Counter = Counter()
    for sample in itertools.islice(
        iter_raw_samples(args.shards, errors, args.cache_dir), args.samples
    ):
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
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def describe_subset(location: str, args: argparse.Namespace, out: io.TextIOBase) -> list[str]:
    """A subset's rules and its kept and removed counts by reason and by source folder; with
    --verify, every source shard's sha256 checked (the problems returned, one line each)."""
    subset = read_subset_if_any(location)
    m = subset.manifest
    rules = ", ".join(f"{k}={v}" for k, v in m["rules"].items() if v not in (None, [], False))
    print(f"  subset of {', '.join(m['sources'])}: {m['kept']} of {m['samples']} samples kept; "
          f"rules: {rules or 'none'}", file=out)  # fmt: skip
    for folder, counts in counts_by_source(subset).items():
        removed = {k: n for k, n in sorted(counts.items()) if k != "kept"}
        reasons = ", ".join(f"{k} {n}" for k, n in removed.items())
        print(f"  {folder}: {counts['kept']} kept, {sum(removed.values())} removed"
              + (f" ({reasons})" if reasons else ""), file=out)  # fmt: skip
    if not args.verify:
        return []
    cache = ShardCache(args.cache_dir or default_cache_dir())

    def sha256_of(path: str) -> str:
        if not storage.is_remote(path):
            return file_sha256(Path(path))
        held = cache.acquire(path)
        try:
            return file_sha256(held.path)
        finally:
            held.release()

    problems = verify_sources(subset, sha256_of)
    print(f"  verified: {len(subset.shards) - len(problems)} of {len(subset.shards)} source "
          "shards have the recorded sha256", file=out)  # fmt: skip
    return problems


def find_tars(spec: str) -> list[tuple[str | None, list[str]]]:
    """(folder, its .tar files sorted) for each folder (local or s3://) the spec names, (None,
    the shards) for a brace pattern or one .tar."""
    found = []
    for entry in parse_source_specs(spec):
        location = storage.normalize(entry.location)
        if storage.is_remote(location) and storage.is_dir(location):
            names = storage.list_names(location)
            folder = location.rstrip("/")
            found.append((folder, [storage.join(folder, n) for n in names if n.endswith(".tar")]))
        elif os.path.isdir(location):
            found.append(
                (location, sorted(glob.glob(os.path.join(glob.escape(location), "*.tar"))))
            )
        else:
            found.append((None, expand_braces(location)))
    paths = [p for _, tars in found for p in tars]
    missing = [p for p in paths if not storage.is_remote(p) and not os.path.isfile(p)]
    if missing:
        raise LoaderConfigError(
            f"{len(missing)} of {len(paths)} shards do not exist (first: {missing[0]})"
        )
    if not paths:
        raise LoaderConfigError(f"no .tar files in {spec}")
    return found


def index_shards(args: argparse.Namespace, out: io.TextIOBase) -> int:
    """Write or check the index of every shard; one line per shard that fails, then a summary.
    Remote shards are read through the node cache and their indexes published beside them.
    A folder without `manifest.json` also gets `sizes.json` (see `update_sizes`), so that
    training and `umt data inspect` take the folder as it is."""
    found = find_tars(args.shards)
    cache = None
    if any(storage.is_remote(p) for _, tars in found for p in tars):
        cache = ShardCache(args.cache_dir or default_cache_dir())
    tally: Counter = Counter()
    counts: dict[str, int] = {}  # shard -> samples, of every shard whose index is right
    for path in (p for _, tars in found for p in tars):
        held = cache.acquire(path) if storage.is_remote(path) else None
        local = str(held.path) if held else None
        try:
            if args.check:
                problems = check_index(path, local)
                tally["right" if not problems else "wrong"] += 1
                for problem in problems:
                    print(f"{path}: {problem}", file=out)
                if not problems:
                    counts[path] = len(read_index(path, local))
                continue
            index = None if args.force else read_index(path, local)
            if index is not None:
                tally["already indexed"] += 1
            else:
                index = index_of_file(path, local)
                write_index(index, index_location(path))
                tally["indexed"] += 1
            counts[path] = len(index)
        except TarIndexError as exc:
            tally["failed"] += 1
            print(exc, file=out)
        finally:
            if held is not None:
                held.release()
    outcomes = ("indexed", "already indexed", "right", "wrong", "failed")
    print(
        f"{sum(len(t) for _, t in found)} shards: "
        + ", ".join(f"{tally[w]} {w}" for w in outcomes if tally[w]),
        file=out,
    )
    sizes_ok = all(
        update_sizes(folder, tars, counts, args, out) for folder, tars in found if folder
    )
    return 1 if tally["failed"] or tally["wrong"] or not sizes_ok else 0


def update_sizes(
    folder: str, tars: list[str], counts: dict[str, int], args: argparse.Namespace, out
) -> bool:
    """Keep `folder/sizes.json` (open_clip's {shard: samples}, which the loader and open_clip
    read) equal to the indexes of the folder's tars, unless the folder has a `manifest.json`
    (`umt shard` wrote both). Entries are added for new tars; an entry that contradicts an
    index, or names a tar that is gone, is left as it is (someone else's file, or stale) unless
    --force. False when sizes.json is not right after this (or, with --check, is not right)."""
    if storage.read_text_if_exists(storage.join(folder, "manifest.json")) is not None:
        return True
    where = storage.join(folder, "sizes.json")
    indexed = {storage.basename(p): counts[p] for p in tars if p in counts}
    if len(indexed) < len(tars):
        what = "not checked" if args.check else "not written"
        print(f"{where}: {what}, {len(tars) - len(indexed)} tars have no right index", file=out)
        return False
    text = storage.read_text_if_exists(where)
    try:
        listed = None if text is None else {k: int(v) for k, v in json.loads(text).items()}
    except (ValueError, AttributeError, TypeError):
        listed = {"(not a {name: count} map)": -1}
    conflicts = [
        f"{name}: {n} listed, " + (f"{indexed[name]} indexed" if name in indexed else "no such tar")
        for name, n in (listed or {}).items()
        if indexed.get(name) != n
    ]
    if listed == indexed:
        print(f"{where}: right ({len(indexed)} shards, {sum(indexed.values())} samples)", file=out)
        return True
    if listed is None and args.check:
        print(f"{where} does not exist: `umt data index {folder}` writes it", file=out)
        return False
    if args.check or (conflicts and not args.force):
        problem = "; ".join(conflicts[:3]) or f"{len(indexed) - len(listed)} tars not listed"
        fix = f"`umt data index {folder}` adds them" if not conflicts else "--force rewrites it"
        print(f"{where} disagrees with the indexes ({problem}): {fix}", file=out)
        return False
    write_json_whole(indexed, where)
    print(f"{where}: written ({len(indexed)} shards, {sum(indexed.values())} samples)", file=out)
    return True


def loader_config(args: argparse.Namespace) -> LoaderConfig:
    return LoaderConfig(
        shards=args.shards,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        num_workers=args.workers,
        seed=args.seed,
        resampled=args.resampled,
        shuffle_window=args.shuffle_window,
        epoch_tail=args.epoch_tail,
        tokenizer=None,
        decode_images=args.decode,
        cache_dir=args.cache_dir,
        cache_limit_gb=args.cache_limit_gb,
        remote_read=args.remote_read,
    )


def print_order(args: argparse.Namespace, out: io.TextIOBase) -> int:
    """Per rank: `step<TAB>micro<TAB>keys` per micro-batch it yields, from its real loader. With
    --global: `step<TAB>keys` of each whole global batch (--counts: samples per source)."""
    cfg = loader_config(args)
    loader = build_loader(cfg, args.rank, args.world_size, epoch=args.epoch)
    g = loader.global_batch
    steps = args.steps
    if steps is None:
        steps = max(0, math.ceil(loader.order.epoch_length(args.epoch) / g) - args.start_step)
    loader.position += args.start_step * g
    if args.global_ and args.counts:
        return print_source_counts(loader, args, steps, out)
    if args.global_:
        return print_global_order(loader, args, steps, out)
    micro = cfg.grad_accum
    for i, batch in enumerate(loader.batches(steps * micro)):
        keys = batch.keys if args.sample_keys else batch.image_keys
        print(f"{args.start_step + i // micro}\t{i % micro}\t{' '.join(keys)}", file=out)
    out.flush()
    if loader.error_counts():
        print(f"replaced: {loader.error_counts()}", file=sys.stderr)
    if loader.io_counts():
        counts = ", ".join(f"{k}={v}" for k, v in sorted(loader.io_counts().items()))
        print(f"storage: {counts}", file=sys.stderr)
    return 0


def print_global_order(loader, args: argparse.Namespace, steps: int, out: io.TextIOBase) -> int:
    """Each global step's sample keys in stream order; with --decode, an unusable sample shows as
    `!reason` (training replaces it with another of its micro-batch)."""
    maker = loader.maker()
    errors: Counter = Counter()
    for step in range(steps):
        start = loader.position + step * loader.global_batch
        ids, _ = maker.order.samples(start, loader.global_batch)
        shards, indices = loader.dataset.locate(ids)
        keys = []
        for j, (shard, index) in enumerate(zip(shards.tolist(), indices.tolist())):
            if args.decode:
                failures: list = []
                if maker.sample_at(start + j, errors, failures, ids[j]) is None:
                    keys.append(f"!{failures[0]['reason']}")
                    continue
            key = loader.dataset.qualify(shard, maker.reader.key(shard, index))
            keys.append(key or "!truncated_tar")
        print(f"{args.start_step + step}\t{' '.join(keys)}", file=out)
    out.flush()
    return 0


def print_source_counts(loader, args: argparse.Namespace, steps: int, out: io.TextIOBase) -> int:
    """`step<TAB>name=n ...`: each global step's samples per source (from the order alone, no
    shard read), then `total<TAB>...` over the steps."""
    names, total = loader.dataset.names, None
    for step in range(steps):
        start = loader.position + step * loader.global_batch
        counts = loader.order.source_counts(start, start + loader.global_batch)
        total = counts if total is None else total + counts
        cells = " ".join(f"{n}={c}" for n, c in zip(names, counts.tolist()))
        print(f"{args.start_step + step}\t{cells}", file=out)
    if total is not None:
        cells = " ".join(f"{n}={c}" for n, c in zip(names, total.tolist()))
        print(f"total\t{cells}", file=out)
    out.flush()
    return 0


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "order" and args.counts and not args.global_:
        parser.error("--counts goes with --global (the samples per source of whole steps)")
    if args.command == "curate":
        return curate_cli.run(args)
    try:
        if args.command == "inspect":
            return inspect_shards(args, sys.stdout)
        if args.command == "index":
            return index_shards(args, sys.stdout)
        return print_order(args, sys.stdout)
    except LoaderConfigError as exc:
        print(f"umt data {args.command}: {exc}", file=sys.stderr)
        return 2
    except (LoaderDataError, StorageError) as exc:
        print(f"umt data {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `umt data order ... | head`
        sys.stderr.close()
        return 0
