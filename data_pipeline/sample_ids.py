"""How samples are identified across processes: an image key (a string: samples that share one,
like COCO's five captions of an image, share it) as an int64 id, so ids can be all-gathered and
compared on any device. The loader hashes keys in its workers; the objectives take the ids."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def key_ids(image_keys: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
    """(n,) int64: a stable 63-bit hash (blake2b) of each key, the same in every process."""
    ids = [
        int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little") >> 1
        for k in image_keys
    ]
    return torch.tensor(ids, dtype=torch.long, device=device)
