"""`umt export CKPT_DIR OUT_DIR`: consolidated safetensors weights + config + tokenizer, loadable with
`umt.load(OUT_DIR)` without DeepSpeed."""

from __future__ import annotations

import argparse
import sys

from launch.cli import gc_paused


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="umt export", description=__doc__)
    parser.add_argument(
        "checkpoint", help="checkpoint root (uses its `latest`) or one step{N} folder"
    )
    parser.add_argument("out_dir", help="export folder to write")
    args = parser.parse_args(argv)
    with gc_paused():  # all of it is start-up: imports, loading and writing the weights
        return export(args)


def export(args: argparse.Namespace) -> int:
    from umt.checkpoint import CheckpointError
    from umt.export import ExportError, export_checkpoint
    from umt.logs import setup_logging

    setup_logging(0)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except (CheckpointError, ExportError) as exc:
        print(f"umt export: {exc}", file=sys.stderr)
        return 1
    print(f"exported to {out}; load it with: model, processor = umt.load({str(out)!r})")
    return 0
