"""The `umt` command: dispatches `umt <command> ...` to `launch.<module>.main(argv)`.

Each command lives in its own module and is imported only when it runs, so `umt --help` and
`umt shard` do not pay for importing DeepSpeed.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). A module that does not exist yet is reported plainly.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("launch.train", "train a model on WebDataset shards with DeepSpeed ZeRO"),
    "shard": ("launch.shard", "turn image-text pairs into WebDataset shards + manifest"),
    "data": ("launch.data", "inspect shards and print the sample order a rank sees"),
    "eval": ("launch.evaluate", "image-text retrieval evaluation of a checkpoint or export"),
    "export": ("launch.export", "consolidate a ZeRO checkpoint into loadable weights"),
    "submit": ("launch.submit", "render a Slurm script from a config and sbatch it"),
    "demo": ("launch.demo", "the whole loop on a CPU on a built-in dataset"),
    "model": ("launch.model", "list model presets and their parameter counts"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: umt <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `umt <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"umt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"umt {name}: not built yet (see the project's open issues)", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
