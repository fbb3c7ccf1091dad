"""`umt shard --out s3://bucket/prefix`: the sharder writes into a local staging folder and
publishes each finished file to the object store, through `data_pipeline.storage`.

Each shard is published whole (an object PUT appears complete or not at all) in the order tar,
index, done-record: a done-record in the store means its shard and index are there. The run's
identity (`.umt-shard/run.json`) is published before the first shard, and `manifest.json` after
everything else, so its presence means the output is complete. A run killed at any point and
started again pulls the store's done-records into its staging folder, checks each one's shard in
the store, and redoes only what is missing: the same bytes as an uninterrupted run, since shards
are deterministic.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from data_pipeline import storage

STATE_DIR = ".umt-shard"


def default_staging(url: str) -> Path:
    """Node-local by default: $TMPDIR (or /tmp)/umt-shard-staging/<hash of the URL>."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(os.environ.get("TMPDIR", "/tmp")) / "umt-shard-staging" / digest


def remote_name(url: str, name: str) -> str:
    """The object of `name` (a path relative to the output folder) under `url`."""
    return storage.join(url, name)


def pull_state(url: str, staging: Path) -> None:
    """Copy the store's run identity and done-records into the staging folder (replacing local
    ones: the store is what a resumed run must agree with)."""
    state = staging / STATE_DIR
    (state / "done").mkdir(parents=True, exist_ok=True)
    for stale in (state / "done").glob("*.json"):
        stale.unlink()
    run = storage.read_text_if_exists(remote_name(url, f"{STATE_DIR}/run.json"))
    if run is not None:
        (state / "run.json").write_text(run, encoding="utf-8")
    else:
        (state / "run.json").unlink(missing_ok=True)
    for name in storage.list_names(remote_name(url, f"{STATE_DIR}/done")):
        if name.endswith(".json"):
            text = storage.read_text(remote_name(url, f"{STATE_DIR}/done/{name}"))
            (state / "done" / name).write_text(text, encoding="utf-8")


def publish(staging: Path, url: str, name: str, keep_local: bool = True) -> None:
    """Put the staging file `name` (relative) at the same name under `url`."""
    storage.put_file(str(staging / name), remote_name(url, name))
    if not keep_local:
        (staging / name).unlink(missing_ok=True)


def remote_size(url: str, name: str) -> int | None:
    """The size of the object `name` under `url`, or None if there is none."""
    try:
        return storage.size(remote_name(url, name))
    except storage.StorageError as exc:
        if str(exc).endswith(": not found"):
            return None
        raise


def foreign_outputs(url: str, prefix: str) -> list[str]:
    """Shards or manifests under `url` (the caller refuses them when no run.json claims them)."""
    return [
        n
        for n in storage.list_names(url)
        if (n.startswith(f"{prefix}-") and n.endswith(".tar")) or n.startswith("manifest")
    ]


def clear(url: str, prefix: str) -> None:
    """Delete what a run publishes under `url` (`--overwrite`): shards, indexes, manifests,
    sizes, error reports and the run state."""
    for name in storage.list_names(remote_name(url, f"{STATE_DIR}/done")):
        storage.remove(remote_name(url, f"{STATE_DIR}/done/{name}"))
    storage.remove(remote_name(url, f"{STATE_DIR}/run.json"))
    for name in storage.list_names(url):
        ours = name.startswith(f"{prefix}-") and name.endswith((".tar", ".index.json"))
        if ours or name.startswith(("manifest", "errors")) or name == "sizes.json":
            storage.remove(remote_name(url, name))
