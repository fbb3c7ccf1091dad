"""The streaming loader: one global sample order, dealt to any number of ranks and workers.

The stages, one module each, in the order data flows:

    specs       data.shards, the spec language: `[name=]PATH[:x2|:30%|:W]` entries or mappings
                {path, name, repeat | proportion | weight}, parsed in this one place
    dataset     specs -> named sources, shards and sample counts (manifest.json / sizes.json /
                indexes); nothing is read to start but the manifests
    mixture     each source's exact count per epoch (repeat, proportion), its rotating part, and
                the fixed pattern that interleaves sources within an epoch
    order       (seed, epoch) -> each source's stream of shards permuted, samples shuffled within
                windows of a few shards, interleaved; the epochs' concatenation is one stream, and
                global step t takes the next G (global batch) positions of it
    (the shard format's tar indexes, `data_pipeline.tar_index`, and pixel conversion,
    `data_pipeline.pixels`, are shared with the sharder; storage is `data_pipeline.storage`)
    reader      (shard, index) -> raw sample by random access; tars in stored order for evaluation
    batch       decode (crop, resize, caption, negative; seeded by stream position) -> `Batch`
                of uint8 pixels and tokens; undecodable samples counted, recorded and replaced
    stream      workers make their rank's micro-batches of each round; `StreamingLoader` is the
                infinite iterator whose state is a position in the stream
    state       the mixture phases a state records (a mixture changed on resume starts one)

Contracts (tested under torchrun with 2 ranks x 2 workers, and across topologies):

* Exactly once: every sample is consumed exactly once per epoch (with a repeat or proportion,
  exactly its source's count: whole passes, then a rotating part without replacement). With
  `epoch_tail: carry` the last partial global batch of an epoch is completed by the next
  epoch's first samples; with `drop` it is not seen that epoch.
* The same stream on any topology: rank r's micro-batch of round k is the stream positions
  [P0 + k W b + r b, ... + b); so global step t holds positions [P0 + tG, P0 + (t+1)G) for any
  split of G into ranks W, micro-batch b and accumulation A, and every rank yields the same
  number of batches (an endless stream).
* Resume anywhere: the state is the position (same on every rank); a run resumed with other
  ranks, workers, micro-batch or accumulation continues at exactly that sample.
* Never a hang: bad samples are counted by reason and replaced; a global batch with no usable
  sample ends the run with one line naming the shards.
* All randomness is seeded from strings of (seed, epoch, window, position): never pid, time or
  `hash()`.
"""

import importlib

# Exported names and the stage module each comes from. Imported on first use, so that a
# command that needs one stage (`umt data inspect`) does not load torch.
_EXPORTS = {
    "Batch": "batch",
    "LoaderConfig": "config",
    "LoaderConfigError": "config",
    "LoaderDataError": "config",
    "LoaderStateError": "config",
    "Dataset": "dataset",
    "Shard": "dataset",
    "Source": "dataset",
    "resolve_dataset": "dataset",
    "RawSample": "reader",
    "StreamingLoader": "stream",
    "build_loader": "stream",
    "iter_raw_samples": "stream",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
