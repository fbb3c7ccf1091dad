"""`umt config list` / `umt config show NAME`: the configs UMT ships, to read or to start one's
own from (`umt config show pretrain_base > my.yaml`). Any command's `--config` takes a path or
one of these names."""

from __future__ import annotations

import argparse
import sys

import yaml


def first_sentence(text: str) -> str:
    """The first sentence of a config's leading comment (it may run over several lines)."""
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    words = " ".join(comment).split()
    for i, word in enumerate(words):
        if word.endswith(".") and not word.endswith(("e.g.", "i.e.")):
            return " ".join(words[: i + 1])
    return " ".join(words)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="umt config", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the shipped configs, one per line with its first comment")
    show = commands.add_parser("show", help="print a shipped config (or a config file)")
    show.add_argument("name", help="a shipped config's name (pretrain_base) or a path")
    args = parser.parse_args(argv)

    from umt.shipped import config_names, config_path, configs_dir

    if args.command == "list":
        names = config_names()
        width = max(map(len, names), default=0)
        for name in names:
            print(
                f"{name:<{width}}  {first_sentence((configs_dir() / f'{name}.yaml').read_text())}"
            )
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
