"""The mixture phases of a stream, as the loader state records them.

A run's stream starts with one phase (the mixture it was started with, from position 0). A
mixture changed on resume (`umt train --resume RUN --new-mixture`) starts another at the
checkpoint's position: each phase is recorded with where it starts (stream position and epoch),
the global batch then, the shards spec, its digest and its sources, so that every later
checkpoint, and the model card of an export, says which data each part of the run saw.
"""

from __future__ import annotations

from data_pipeline.loader.config import LoaderConfig
from data_pipeline.loader.dataset import Dataset
from data_pipeline.loader.mixture import epoch_shares


def phase_record(dataset: Dataset, cfg: LoaderConfig, origin: tuple[int, int], batch: int) -> dict:
    """A phase as the state and the model card record it (plain JSON)."""
    shares = [None] * len(dataset.sources) if cfg.resampled else epoch_shares(dataset)
    sources = []
    for source, share in zip(dataset.sources, shares):
        entry = {"name": source.name, "samples": source.total_samples}
        if cfg.resampled:
            entry["weight"] = source.weight
        else:
            entry |= source.mixture | {"per_epoch": float(share)}
        sources.append(entry)
    return {
        "start": origin[0],
        "epoch": origin[1],
        "global_batch": batch,
        "digest": dataset.digest(),
        "shards": cfg.shards,
        "sources": sources,
    }


def describe_phase(phase: dict) -> str:
    """`a x1 (700 per epoch), b x0.5 (150 per epoch)`, or by weight / proportion."""
    parts = []
    for s in phase.get("sources", []):
        if "weight" in s:
            parts.append(f"{s['name']} weight {s['weight']:g}")
            continue
        mix = (
            f"{s['proportion']:.4g} of each epoch"
            if "proportion" in s
            else f"x{s.get('repeat', 1):g}"
        )
        parts.append(f"{s['name']} {mix} ({s['per_epoch']:g} per epoch)")
    return ", ".join(parts) or f"data {phase.get('digest')}"


def earlier_phases(state: dict) -> list[dict]:
    """The phases a saved state records (a state from before phases: one, from the start)."""
    if "phases" in state:
        return list(state["phases"])
    return [{"start": 0, "epoch": 0, "digest": state.get("data_digest")}]


def next_phase_epoch(state: dict) -> int:
    """The epoch a new phase starts with at the state's position: the state's epoch when the
    position is its first sample, else the next one (its numbers seed the new epochs, so they
    are not those of the epochs already seen)."""
    epoch, position = int(state["epoch"]), int(state["position"])
    start = state.get("epoch_start")
    if start is None:  # a state from before phases: epochs of equal length
        length = int(state["samples_per_epoch"])
        if state["epoch_tail"] == "drop":
            length -= length % int(state["global_batch"])
        start = epoch * length
    return epoch if position == int(start) else epoch + 1


def data_change(state: dict, dataset: Dataset) -> str:
    """Why a saved state does not fit this data, naming the sources that differ."""
    theirs = state.get("sources")
    mine = {s.name: s.digest() for s in dataset.sources}
    if theirs is None:
        what = "its data (shards, counts or mixture)"
    else:
        added = [n for n in mine if n not in theirs]
        removed = [n for n in theirs if n not in mine]
        changed = [n for n in mine if n in theirs and theirs[n] != mine[n]]
        what = "; ".join(
            f"{label} {', '.join(names)}"
            for label, names in (
                ("sources added:", added),
                ("sources removed:", removed),
                ("sources whose shards, counts or mixture changed:", changed),
            )
            if names
        )
    return (
        f"loader state was saved with other data (data_digest {state['data_digest']}, this "
        f"loader's {dataset.digest()}): {what}; `umt train --resume RUN --new-mixture` continues "
        "with this mixture from the saved position (a new phase), else use the data it was saved "
        "with"
    )
