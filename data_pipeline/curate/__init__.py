"""Curation (`umt data curate`): deduplicate, decontaminate and filter shards into a subset, a
view over them (data_pipeline.subset), or into new shards (--materialize).

The stages, one module each, in the order a run goes:

    options      what is asked (`CurateOptions`), checked before any shard is read
    scan         each source shard read once (`features` per image, `scorers` per pair), its
                 Parquet tables named by content, written atomically, then its done-record;
                 in worker processes, and split over ranks (torchrun, srun)
    near         exact Hamming range search over the perceptual hashes (multi-index hashing),
                 the colour check, and the first-of-each-group rule
    rules        the global step: every sample's decision and evidence, rules in a fixed order
    outputs      removed.jsonl, then subset.json (its presence means complete), the summary
    materialize  the kept samples as shards, through the sharder's tar writer
    run          `curate`: plan, scan this rank's share, and the global step once all are done

Scoring models come in through `scorers` (a UMT export or open_clip), imported only when used.
"""

import importlib

# Exported names and the stage module each comes from, imported on first use: the CLI's parser
# needs `options` only.
_EXPORTS = {
    "CurateError": "options",
    "CurateOptions": "options",
    "validate_options": "options",
    "CurateSummary": "outputs",
    "curate": "run",
    "FAILPOINT_ENV": "scan",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
