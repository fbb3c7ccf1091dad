"""`umt config list` / `umt config show NAME`: the configs UMT ships, to read or to start one's
own from (`umt config show pretrain_base > my.yaml`). Any command's `--config` takes a path or
one of these names."""

from __future__ import annotations

import argparse
import sys

import yaml


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="umt config", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the shipped configs, one per line with its first comment")
    show = commands.add_parser("show", help="print a shipped config (or a config file)")
    show.add_argument("name", help="a shipped config's name (pretrain_base) or a path")
    args = parser.parse_args(argv)

    from umt.shipped import config_names, config_path, configs_dir

    if args.command == "list":
        for name in config_names():
            text = (configs_dir() / f"{name}.yaml").read_text()
            about = next(
                (line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")),
                "",
            )
            print(f"{name:<16} {about}")
        return 0
    path = config_path(args.name)
    if not path.is_file():
        print(
            f"umt config: no config {args.name!r}; shipped: {', '.join(config_names())}",
            file=sys.stderr,
        )
        return 2
    text = path.read_text()
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:
        print(f"umt config: {path} is not valid YAML: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0
