"""One source shard, read once: every sample decoded, its features and (with a scorer) its
image-caption similarity, written as Parquet tables; then the shard's done-record.

Tables are named by the shard's content (sha256, the positions read, the features' version, the
scorer's identity), so any run over the same shard with any thresholds reuses them: a second
pass recomputes nothing. Each file is written under a temporary name and renamed; the
done-record comes last, so a run killed at any point and started again redoes at most the shards
it was in the middle of.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import faults, storage
from data_pipeline.curate.features import FEATURES_VERSION, FeatureBatch, decode_rgb
from data_pipeline.loader.dataset import Shard
from data_pipeline.loader.reader import ShardReader
from data_pipeline.shard.manifest import file_sha256, write_json_atomic
from data_pipeline.shard_cache import ShardCache, default_cache_dir

FAILPOINT_ENV = faults.CURATE_FAILPOINT  # test hook: "{task name}" or "finalize"
FEATURE_BATCH = 256  # images whose thumbnail features are computed together

HASH_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),  # the sample's place among the tar's samples (its index)
        ("key", pa.string()),
        ("image_key", pa.string()),
        ("caption", pa.string()),
        ("words", pa.int32()),
        ("error", pa.string()),  # why it cannot be used (null: readable)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixel_sha", pa.string()),
        ("phash", pa.binary()),  # VIEWS x 8 bytes
        ("color", pa.binary()),  # 64 x uint16
    ]
)
SCORE_SCHEMA = pa.schema([("position", pa.int64()), ("score", pa.float32())])


@dataclass(frozen=True)
class ShardTask:
    """One source shard to scan; `name` (`train-000003`, `eval0-000001`) names its record."""

    name: str
    shard: Shard
    manifest_sha: str | None  # what its folder's manifest says, if it says
    table_dir: str
    state_dir: str
    scorer: str | None = None
    scorer_id: str | None = None
    score_batch: int = 32
    device: str = "auto"
    cache_dir: str | None = None

    @property
    def positions(self) -> np.ndarray:
        """Tar positions to read: all, or those a subset given as input keeps."""
        if self.shard.kept is not None:
            return self.shard.kept
        return np.arange(self.shard.count, dtype=np.int64)


def done_path(state_dir: str, name: str) -> Path:
    return Path(state_dir) / "done" / f"{name}.json"


def table_names(task: ShardTask, sha: str) -> tuple[str, str | None]:
    """(hashes table, scores table or None): named by content, so reruns reuse them."""
    stem = sha[:32]
    if task.shard.kept is not None:  # a subset's positions only: not the whole shard's table
        stem += "-" + hashlib.sha256(task.positions.astype("<i8").tobytes()).hexdigest()[:12]
    hashes = f"hashes-v{FEATURES_VERSION}-{stem}.parquet"
    scores = f"scores-{task.scorer_id}-{stem}.parquet" if task.scorer_id else None
    return hashes, scores


def load_done(task: ShardTask) -> dict | None:
    """The shard's record if its tables are all there (else it is scanned again)."""
    path = done_path(task.state_dir, task.name)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    tables = [record["hashes"]] + ([record["scores"]] if task.scorer_id else [])
    if record.get("scores_of") != task.scorer_id or not all(
        (Path(task.table_dir) / t).is_file() for t in tables if t
    ):
        return None
    return record


def shard_identity(task: ShardTask, cache: ShardCache | None) -> tuple[str, int | None]:
    """(sha256, bytes) of the shard as read: its manifest's sha256 when the manifest describes
    this file (same size), else computed from the file (or its cached copy)."""
    path = task.shard.path
    if not storage.is_remote(path):
        size = storage.size(path)
        if task.manifest_sha and size == task.shard.bytes:
            return task.manifest_sha, size
        return file_sha256(Path(path)), size
    if task.manifest_sha:
        return task.manifest_sha, task.shard.bytes
    held = cache.acquire(path, task.shard.bytes)
    try:
        return file_sha256(held.path), held.path.stat().st_size
    finally:
        held.release()


def scan_shard(task: ShardTask) -> dict:
    """Scan one shard (or reuse its tables), write its done-record and return it."""
    if (record := load_done(task)) is not None:
        return record
    remote = storage.is_remote(task.shard.path)
    cache = ShardCache(task.cache_dir or default_cache_dir()) if remote else None
    sha, size = shard_identity(task, cache)
    hashes_name, scores_name = table_names(task, sha)
    tables = Path(task.table_dir)
    tables.mkdir(parents=True, exist_ok=True)
    need_hashes = not (tables / hashes_name).is_file()
    need_scores = scores_name is not None and not (tables / scores_name).is_file()
    errors: Counter = Counter()
    if need_hashes or need_scores:
        scorer = scorer_for(task) if need_scores else None
        rows, scores = read_shard(task, cache, scorer, features=need_hashes)
        if need_hashes:
            write_table(pa.Table.from_pylist(rows, schema=HASH_SCHEMA), tables / hashes_name)
        if need_scores:
            positions = [row["position"] for row in rows]
            table = pa.table({"position": positions, "score": scores}, schema=SCORE_SCHEMA)
            write_table(table, tables / scores_name)
        errors.update(row["error"] for row in rows if row["error"])
    record = {
        "path": task.shard.path,
        "sha256": sha,
        "bytes": size,
        "manifest_sha256": task.manifest_sha,  # what its folder's manifest said, to check later
        "samples": int(len(task.positions)),
        "hashes": hashes_name,
        "scores": scores_name,
        "scores_of": task.scorer_id,
    }
    write_json_atomic(done_path(task.state_dir, task.name), record)
    failpoint(task.name)
    return record


_SCORERS: dict = {}  # spec -> scorer, loaded once per process (a worker scans many shards)


def scorer_for(task: ShardTask):
    from data_pipeline.curate.scorers import load_scorer

    if task.scorer not in _SCORERS:
        _SCORERS[task.scorer] = load_scorer(task.scorer, task.device)
    return _SCORERS[task.scorer]


def read_shard(
    task: ShardTask, cache: ShardCache | None, scorer, features: bool = True
) -> tuple[list[dict], list]:
    """Every sample's row of the hashes table (its image features when `features`) and, with
    a scorer, its similarity (NaN for a sample that cannot be used)."""
    reader = ShardReader((task.shard,), cache, keep_open=1)
    rows, scores = [], []
    pending = FeatureBatch()
    batch: list[tuple[int, object, str]] = []  # (row, image, caption) awaiting the scorer

    def score() -> None:
        if batch:
            values = scorer.score([b[1] for b in batch], [b[2] for b in batch])
            for (row, _, _), value in zip(batch, values):
                scores[row] = float(value)
            batch.clear()

    try:
        for position in task.positions.tolist():
            row, rgb = read_sample(reader, position)
            rows.append(row)
            scores.append(float("nan"))
            if rgb is None:
                continue
            if features:
                pending.add(row, rgb)
                if len(pending.rows) >= FEATURE_BATCH:
                    pending.finish()
            if scorer is not None:
                batch.append((len(rows) - 1, rgb, row["caption"]))
                if len(batch) >= task.score_batch:
                    score()
        pending.finish()
        if scorer is not None:
            score()
    finally:
        reader.close()
    return rows, scores


def read_sample(reader: ShardReader, position: int) -> tuple[dict, object]:
    """(table row, decoded RGB image or None) of the sample at `position`."""
    errors: Counter = Counter()
    raw = reader.read(0, position, errors)
    row = dict.fromkeys(HASH_SCHEMA.names)
    row["position"] = position
    if raw is None:
        row["key"] = reader.key(0, position)
        row["error"] = next(iter(errors), "unreadable")
        return row, None
    row.update(key=raw.key, image_key=raw.image_key, caption=raw.text)
    row["words"] = len(raw.text.split())
    try:
        return row, decode_rgb(raw.image)
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, bombs ...
        row["error"] = "corrupt_image"
        return row, None


def write_table(table: pa.Table, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def failpoint(here: str) -> None:
    """Test hook (UMT_CURATE_FAILPOINT): SIGKILL the run and its workers at a set point."""
    faults.trigger_failpoint(faults.curate_failpoint(), here)
