"""What a run was made with: the versions of umt, torch, deepspeed and transformers, and the git
commit of a source checkout. Written to OUTPUT_DIR/versions.json at every start; a resume made
with other versions says which, since numbers may then differ from the run's first part."""

from __future__ import annotations

import json
import logging
import subprocess
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)
PACKAGES = ("umt", "torch", "deepspeed", "transformers")
FILE = "versions.json"


def umt_version() -> str:
    try:
        return metadata.version("umt")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def current() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    tree = Path(__file__).resolve().parents[1]
    commit = None
    if (tree / ".git").exists():
        proc = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        commit = proc.stdout.strip() or None if proc.returncode == 0 else None
    versions["git_commit"] = commit
    return versions


def record(run_dir: Path, resuming: bool) -> None:
    """Write this start's versions; on a resume, warn about each that differs from the last."""
    path = run_dir / FILE
    now = current()
    if resuming and path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = {}
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
        if changed:
            log.warning(
                "resuming with other versions than the run's last start: %s", "; ".join(changed)
            )
    path.write_text(json.dumps(now, indent=2) + "\n")
