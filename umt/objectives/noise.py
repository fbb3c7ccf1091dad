"""Counter-based Gumbel noise: a pure function of (seed, stream, row, column).

Hard negatives are drawn by Gumbel-max over a row of logits. With noise from a generator stream,
the draw depends on the order in which the columns are visited and on how the matrix is cut; a
hash of the global (row, column) makes every way of computing ITC (all-gathered logits, a ring
of blocks, tiles of any size) draw the same negatives from the same seed.
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _MASK
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical shift of int64 bits (torch's >> sign-extends)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps around, as in C)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _M1
    x = (x ^ _shift_right(x, 27)) * _M2
    return x ^ _shift_right(x, 31)


def _splitmix_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def gumbel(seed: int, stream: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(r, c) float64 standard Gumbel noise for global `rows` (r,) x `cols` (c,) (int64)."""
    base = _signed(_splitmix_int(_splitmix_int(seed) ^ stream))
    row_hash = _splitmix(rows.long() + base)
    h = _splitmix(row_hash[:, None] + cols.long()[None, :])
    u = (_shift_right(h, 11).double() + 0.5) * 2.0**-53  # in (0, 1), 53 random bits
    return -torch.log(-torch.log(u))
