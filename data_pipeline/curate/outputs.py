"""What the global step writes: `removed.jsonl` (each removed sample, its reason and evidence)
and then `subset.json` (data_pipeline.subset's format), and the one-line summary."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.curate.options import CurateOptions
from data_pipeline.curate.rules import REASONS, Decisions, Samples
from data_pipeline.shard.manifest import write_json_atomic
from data_pipeline.subset import CREATED_BY, FORMAT_VERSION, REMOVED_FILE, SUBSET_FILE, runs_of


@dataclass
class CurateSummary:
    out: str
    samples: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    scanned: int = 0  # shards this process scanned (or found scanned)
    written: bool = True  # False: another rank writes the subset
    materialized: str | None = None

    def line(self) -> str:
        if not self.written:
            return (
                f"{self.scanned} shards scanned here; the last rank to finish writes the "
                f"subset -> {self.out}"
            )
        reasons = ", ".join(f"{r}: {n}" for r, n in self.removed.items())
        removed = sum(self.removed.values())
        text = (
            f"{self.samples} samples in {self.shards} shards: {self.kept} kept, {removed} "
            f"removed" + (f" ({reasons})" if reasons else "") + f" -> {self.out}"
        )
        return text + (f"; shards written to {self.materialized}" if self.materialized else "")


def removed_counts(decisions: Decisions) -> dict[str, int]:
    counts = Counter(r for r in decisions.reason if r is not None)
    return {reason: counts[reason] for reason in REASONS if counts[reason]}


def removed_lines(train: Samples, decisions: Decisions) -> list[dict]:
    return [
        {**train.ref(i), "reason": reason, "evidence": decisions.evidence[i]}
        for i, reason in enumerate(decisions.reason)
        if reason is not None
    ]


def subset_manifest(
    train: Samples, records: list[dict], decisions: Decisions, options: CurateOptions
) -> dict:
    kept = decisions.kept
    shards = []
    for index, record in enumerate(records):
        mine = train.shard == index
        positions = train.position[mine & kept]
        shards.append(
            {
                "path": record["path"],
                "sha256": record["sha256"],
                "bytes": record["bytes"],
                "manifest_sha256": record["manifest_sha256"],
                "samples": int(record["samples"]),
                "kept": int(positions.size),
                "runs": runs_of(np.sort(positions)),
            }
        )
    return {
        "format_version": FORMAT_VERSION,
        "created_by": CREATED_BY,
        "sources": list(options.sources),
        "rules": options.rules(),
        "samples": len(train),
        "kept": int(kept.sum()),
        "removed": removed_counts(decisions),
        "shards": shards,
    }


def write_subset(out: Path, manifest: dict, removed: list[dict], before_manifest) -> None:
    """removed.jsonl, then (after `before_manifest()`, a test hook) subset.json: its presence
    means the subset is complete."""
    write_json_atomic(out / REMOVED_FILE, removed, lines=True)
    before_manifest()
    write_json_atomic(out / SUBSET_FILE, manifest)


def summary_of(out: str, manifest: dict, scanned: int) -> CurateSummary:
    return CurateSummary(
        out=out,
        samples=manifest["samples"],
        kept=manifest["kept"],
        removed=dict(manifest["removed"]),
        shards=len(manifest["shards"]),
        scanned=scanned,
    )


def read_manifest(out: Path) -> dict:
    return json.loads((out / SUBSET_FILE).read_text(encoding="utf-8"))
