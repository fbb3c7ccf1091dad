"""Per-rank, per-step record files of a run: which samples each step trained on
(`sample_keys/rank{R}.txt`, with data.log_sample_keys) and which samples the loader could not use
(`data_errors/rank{R}.jsonl`).

Lines are appended as steps finish and across requeues; when a run resumes from step k, lines of
steps after k are dropped first (those steps are trained again), so each file describes exactly
the steps that the final weights went through.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SAMPLE_KEYS = "sample_keys"
DATA_ERRORS = "data_errors"


def line_step(line: str, jsonl: bool) -> int:
    if jsonl:
        return int(json.loads(line)["step"])
    return int(line.split(" ", 1)[0])


def truncate_after(run_dir: Path, step: int) -> None:
    """Drop every rank's lines of steps after `step` (before any rank appends again)."""
    for folder, jsonl in ((SAMPLE_KEYS, False), (DATA_ERRORS, True)):
        for path in sorted((run_dir / folder).glob("rank*.*")):
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and line_step(line, jsonl) <= step]
            if len(kept) != len(lines):
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)


class StepLog:
    """This rank's two record files, appended one step at a time."""

    def __init__(self, run_dir: Path, rank: int, sample_keys: bool):
        self.keys_path = run_dir / SAMPLE_KEYS / f"rank{rank}.txt" if sample_keys else None
        self.errors_path = run_dir / DATA_ERRORS / f"rank{rank}.jsonl"

    def record(self, step: int, keys: list[str], failures: list[dict]) -> None:
        if self.keys_path is not None:
            self._append(self.keys_path, f"{step} {' '.join(keys)}\n")
        if failures:
            lines = "".join(json.dumps({"step": step, **f}) + "\n" for f in failures)
            self._append(self.errors_path, lines)

    @staticmethod
    def _append(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(text)
