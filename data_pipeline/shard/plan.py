"""The plan: rows (seeded shuffle) cut into shards, and each sample's fixed key."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from data_pipeline.shard.options import ShardOptions
from data_pipeline.shard.sources import Row


class WorkItem(NamedTuple):
    """One row's place in the plan: its samples get keys (key_shard, first_slot + j)."""

    row: int  # index into the input's row list
    key_shard: int
    first_slot: int
    samples: int  # 0 for rows already known to fail (no usable caption, reader problem)


class ShardTask(NamedTuple):
    index: int
    name: str
    items: list[WorkItem]


@dataclass(frozen=True)
class KeyLayout:
    """Zero-padded digits of sample keys, fixed by the plan: `{shard}{slot}` without dots."""

    shard_digits: int
    slot_digits: int

    def key(self, shard: int, slot: int) -> str:
        return f"{shard:0{self.shard_digits}d}{slot:0{self.slot_digits}d}"


def clean_captions(captions: Iterable[str]) -> list[str]:
    """Captions stripped of surrounding whitespace; empty ones dropped."""
    return [text.strip() for text in captions if text.strip()]


def sample_count(row: Row, per: str) -> int:
    if row.problem is not None:
        return 0
    captions = clean_captions(row.captions)
    if not captions:
        return 0
    return len(captions) if per == "caption" else 1


def plan_shards(rows: list[Row], options: ShardOptions) -> list[list[WorkItem]]:
    """Rows (shuffled by `seed`) cut into shards of at most `maxcount` samples.

    A row is never split across shards; one row with more captions than `maxcount` fills a shard
    on its own. Rows that will fail anyway take no slot but still belong to a shard, so their
    failure is recorded by whoever writes that shard.
    """
    order = list(range(len(rows)))
    if options.seed is not None:
        random.Random(options.seed).shuffle(order)
    shards: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    used = 0
    for position in order:
        n = sample_count(rows[position], options.per)
        if current and n and used + n > options.maxcount:
            shards.append(current)
            current, used = [], 0
        current.append(WorkItem(position, len(shards), used, n))
        used += n
    if current:
        shards.append(current)
    return shards


def key_layout(plan: list[list[WorkItem]], maxcount: int) -> KeyLayout:
    most_slots = max([maxcount] + [item.first_slot + item.samples for s in plan for item in s])
    return KeyLayout(max(6, len(str(len(plan) - 1))), len(str(most_slots - 1)))


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def cut_overflow(items: list[WorkItem], maxcount: int) -> list[list[WorkItem]]:
    """Rolled-over rows (keeping their keys) cut into shards of at most `maxcount` samples."""
    shards: list[list[WorkItem]] = []
    used = maxcount + 1
    for item in items:
        if used + item.samples > maxcount and item.samples:
            shards.append([])
            used = 0
        if not shards:
            shards.append([])
        shards[-1].append(item)
        used += item.samples
    return shards
