"""`umt eval --model CKPT_OR_EXPORT --shards SPEC --out report.json [--itm-rerank K]`: image-text
retrieval (R@1/5/10 both directions), also under torchrun with identical numbers. SPEC may be a
local folder or pattern, `s3://bucket/prefix` or `http(s)://host/path/`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from launch.cli import gc_paused


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="umt eval", description=__doc__)
    parser.add_argument(
        "--model", required=True, help="export folder, checkpoint root or step{N} folder"
    )
    parser.add_argument(
        "--shards", required=True, help="evaluation shards (folder, brace pattern, list)"
    )
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument(
        "--classes", help="zero-shot classification instead: a file with one class name per line"
    )
    parser.add_argument(
        "--templates",
        help="with --classes: prompt templates with {} for the class name, separated by '|' "
        "(default: 'a photo of a {}.|a picture of a {}.|{}')",
    )
    parser.add_argument(
        "--label-field",
        metavar="FIELD",
        help="with --classes: a sample's class is this json field of it (e.g. a column kept by "
        "umt shard --save-additional-columns); default: its caption, when it equals a class name",
    )
    parser.add_argument(
        "--itm-rerank",
        type=int,
        default=0,
        metavar="K",
        help="re-rank the ITC top-K with ITM (COCO: 256, Flickr: 128)",
    )
    parser.add_argument(
        "--score", choices=["itm", "itm+itc"], default="itm", help="re-rank score (BLIP adds ITC)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--cache-dir", help="node-local folder for copies of s3:// or http(s):// shards"
    )
    parser.add_argument("--tensorboard", help="also write eval/<name>/... scalars to this folder")
    parser.add_argument(
        "--name", help="set name in TensorBoard tags (default: the shard folder's name)"
    )
    args = parser.parse_args(argv)
    with gc_paused() as work_begins:  # start-up, until the model is loaded
        return evaluate(args, work_begins)


def evaluate(args: argparse.Namespace, work_begins: Callable[[], None]) -> int:
    from umt.checkpoint import CheckpointError
    from umt.distributed import discover_world, init_distributed, shutdown
    from umt.evaluate import (
        EvalData,
        EvalDataError,
        evaluate_retrieval,
        format_report,
        report_scalars,
        set_name,
    )
    from umt.export import ExportError, load_model
    from umt.logs import setup_logging
    from umt.metrics import MetricsWriter

    setup_logging(discover_world().rank)
    # Flags that name files are checked before the model is loaded (a minute on a big checkpoint).
    problem = check_paths(args)
    if problem:
        if discover_world().rank == 0:
            print(f"umt eval: {problem}", file=sys.stderr)
        return 2
    # Under a launcher: this rank's GPU (LOCAL_RANK mod visible GPUs) and a process group, NCCL
    # on GPUs; a plain process evaluates alone.
    world, device = init_distributed(always=False)
    try:
        model, processor = load_model(args.model, device)
    except (ExportError, CheckpointError, OSError) as exc:
        print(f"umt eval: {exc}", file=sys.stderr)
        return 1
    if processor.tokenizer is None:
        print("umt eval: the model carries no tokenizer name; export it with one", file=sys.stderr)
        return 1
    work_begins()
    data = EvalData(
        args.shards,
        processor.tokenizer,
        processor.image_size,
        processor.max_length,
        args.batch_size,
        processor.mean,
        processor.std,
        cache_dir=args.cache_dir,
    )
    if args.classes:
        from umt.evaluate import DEFAULT_TEMPLATES, zero_shot_classification

        classes = [c.strip() for c in Path(args.classes).read_text().splitlines() if c.strip()]
        templates = args.templates.split("|") if args.templates else DEFAULT_TEMPLATES
        try:
            report = zero_shot_classification(model, data, classes, templates, args.label_field)
        except EvalDataError as exc:
            if world.rank == 0:
                print(f"umt eval: {exc}", file=sys.stderr)
            return 1
        report |= {"model": str(args.model), "shards": args.shards, "templates": list(templates)}
        if world.rank == 0:
            print(
                f"zero-shot: {report['samples']} images, {report['classes']} classes: "
                f"top-1 {report['top1']:.2f}%, top-5 {report['top5']:.2f}% (chance "
                f"{report['chance_top1']:.2f}% and {report['chance_top5']:.2f}%; "
                f"{report['unlabelled']} unlabelled and {report['unreadable']} unreadable "
                "left out)"
            )
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=2))
        shutdown()
        return 0
    try:
        report = evaluate_retrieval(model, data, args.itm_rerank, args.score == "itm+itc", device)
    except EvalDataError as exc:
        if world.rank == 0:
            print(f"umt eval: {exc}", file=sys.stderr)
        return 1
    report |= {
        "model": str(args.model),
        "shards": args.shards,
        "itm_rerank": args.itm_rerank,
        "score": args.score,
    }
    if world.rank == 0:
        print(format_report(report))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))
        if args.tensorboard:
            writer = MetricsWriter(Path(args.tensorboard))
            writer.scalars(report_scalars(report, args.name or set_name(args.shards)), 0)
            writer.close()
    shutdown()
    return 0


def check_paths(args) -> str | None:
    """The first of --model, --shards, --classes, --templates that cannot be used, in one line."""
    from data_pipeline.loader import LoaderConfigError, resolve_dataset
    from data_pipeline.storage import StorageError
    from data_pipeline.tar_index import TarIndexError

    if not Path(args.model).exists():
        return f"--model {args.model}: no such file or folder"
    if args.classes:
        classes = Path(args.classes)
        if not classes.is_file():
            return f"--classes {args.classes}: no such file (one class name per line)"
        try:
            names = [c for c in classes.read_text(encoding="utf-8").splitlines() if c.strip()]
        except UnicodeDecodeError as exc:
            return f"--classes {args.classes}: not UTF-8 text (byte {exc.start})"
        if len(names) < 2:
            return f"--classes {args.classes}: needs at least 2 class names (found {len(names)})"
    if args.label_field and not args.classes:
        return "--label-field: only with --classes (zero-shot classification)"
    if args.templates is not None and any("{}" not in t for t in args.templates.split("|")):
        return f"--templates {args.templates!r}: each template needs {{}} for the class name"
    try:
        resolve_dataset(args.shards)  # read in stored order: mixing fields are ignored
    except (LoaderConfigError, TarIndexError, StorageError) as exc:
        message = str(exc).removeprefix("data.shards").lstrip(": ")
        return f"--shards {args.shards}: {message}"
    return None
