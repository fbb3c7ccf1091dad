"""Files UMT ships beside its code: the configs (`configs/*.yaml`) and the Slurm templates
(`slurm/`). In a source checkout they are read where they are; in a wheel they are packages of
their own (`umt_configs`, `umt_slurm`, mapped from those folders at build time by pyproject.toml).
A config is named by its path or by its name: `--config pretrain_base`."""

from __future__ import annotations

import importlib
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parents[1]


def _folder(source: str, package: str) -> Path:
    in_tree = SOURCE_TREE / source
    if (SOURCE_TREE / "pyproject.toml").is_file() and in_tree.is_dir():
        return in_tree
    # A folder without __init__.py is a namespace package: its (single) folder is __path__[0].
    return Path(list(importlib.import_module(package).__path__)[0])


def configs_dir() -> Path:
    return _folder("configs", "umt_configs")


def slurm_dir() -> Path:
    return _folder("slurm", "umt_slurm")


def config_names() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A config file: the path when one exists there, else the shipped config of that name
    (`pretrain_base` or `pretrain_base.yaml`); a name that is neither is returned as given, for
    the caller's own "does not exist" error."""
    path = Path(name_or_path)
    if path.is_file() or path.parent != Path("."):
        return path
    shipped = configs_dir() / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path
