"""The sharder (`umt shard`): plans, writes and resumes WebDataset shards, their manifest and
error report. Reading rows is `data_pipeline.shard.sources`; each stage below is a module of its own:
`options`, `plan`, `download`, `images`, `write` (one shard), `pool` (worker processes),
`manifest` (done-records, identity, manifest, merges) and `run` (`shard_dataset`).

How a run goes (`shard_dataset`):
1. read every row (`sources.read_source`), fingerprint rows + output-affecting options, and
   refuse an output folder that holds another run's shards;
2. plan shards up front: the seeded shuffle of the rows, cut into slices of at most `maxcount`
   samples. A sample's key is fixed by the plan (planned shard, slot), never by timing;
3. workers write whole planned shards: `{name}.tmp`, fsync, rename, then a done-record in
   `.umt-shard/done/{name}.json` with count, bytes, sha256 and the failures of its rows;
4. a shard that reaches `maxsize` closes early; its remaining rows roll over, in plan order, into
   overflow shards numbered after the planned ones (they depend only on processed bytes, which
   are deterministic);
5. manifest.json, sizes.json and errors.jsonl are rebuilt from the done-records, so a run killed
   at any moment and started again with the same arguments ends byte-identical to one that never
   stopped.
"""

from data_pipeline.shard.images import StoredImage, prepare_image
from data_pipeline.shard.manifest import STATE_DIR, ShardSummary, merge_parts
from data_pipeline.shard.options import (
    IMAGE_FORMATS,
    PER_MODES,
    RESAMPLE_FILTERS,
    RESIZE_MODES,
    OtherRunError,
    SampleError,
    ShardError,
    ShardOptions,
    validate_options,
)
from data_pipeline.shard.run import shard_dataset
from data_pipeline.shard.write import FAILPOINT_ENV

__all__ = [
    "FAILPOINT_ENV",
    "IMAGE_FORMATS",
    "PER_MODES",
    "RESAMPLE_FILTERS",
    "RESIZE_MODES",
    "STATE_DIR",
    "OtherRunError",
    "SampleError",
    "ShardError",
    "ShardOptions",
    "ShardSummary",
    "StoredImage",
    "merge_parts",
    "prepare_image",
    "shard_dataset",
    "validate_options",
]
