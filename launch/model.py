"""`umt model`: list the model presets with their parameter counts by part."""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="umt model", description=__doc__)
    parser.add_argument("preset", nargs="?", help="show one preset (default: all)")
    args = parser.parse_args(argv)

    from umt.model import build_model, list_presets
    from umt.model.unified import format_parameter_table

    names = [args.preset] if args.preset else list_presets()
    unknown = [n for n in names if n not in list_presets()]
    if unknown:
        print(
            f"umt model: unknown preset {unknown[0]!r}; the presets: {', '.join(list_presets())}",
            file=sys.stderr,
        )
        return 2
    for name in names:
        with torch.device("meta"):  # counts only: no memory, no init time
            model = build_model(name, log_table=False)
        print(f"{name}\n{format_parameter_table(model.num_parameters())}\n")
    return 0
