"""The data side of UMT: everything about pairs, shards and samples, nothing about models.

The three jobs, each a package by stage:
- `shard/`: pairs (tables, COCO/Karpathy JSON, folders, URLs) -> WebDataset shards + manifest;
- `loader/`: shards -> one global sample order, dealt to ranks and workers, decoded and batched;
- `curate/`: shards -> a subset (`subset.py`: a view over shards, read by the loader).
What they share, one module each: `storage` (local, s3://, http(s):// through fsspec, retries),
`shard_cache` (the node-local cache of remote shards), `tar_index` (where a sample's members lie
in its tar), `pixels` (images to 8-bit RGB, the evaluation crop, normalisation), `sample_ids`
(image keys as int64 ids), `transforms` (training crops and tokenisation), `faults` (every test
hook that injects a failure). Besides: `builtin` (the demo's dataset), `synthetic` (random
batches for benchmarks) and `tokenizer_training` (`umt tokenizer train`).

Nothing here imports `umt` or `launch` at import time (tests/test_layers.py); the one call
upward is curation scoring with a UMT export, made when it runs.
"""
