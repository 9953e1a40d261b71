"""Counter-based random keep masks (DARE, DELLA): reproducible on every backend and thread count.

For model ``i`` and flat element index ``j``:

    s1, s2 = stream_keys(seed, i)                  (per-model keys, computed once)
    hash(c) = mix32(lo32(c) ^ s1 ^ mix32(hi32(c) ^ s2))

DARE (``random_keep_mask``) draws 16 bits per element, two elements per hash:

    c    = (j >> 4)·8 + (j & 7)                    (elements j and j + 8 of a 16-group share c)
    u16  = hash(c) & 0xFFFF if bit 3 of j is 0, else hash(c) >> 16
    keep = u16 < p16,   p16 = floor(p · 2^16)

DELLA draws 24 bits per element (its keep probabilities differ per element): u24 = hash(j) >> 8.

``mix32`` is the "lowbias32" integer finaliser (Wellons). Below 2^32 counters the inner term is
one constant per model, so a DARE element costs half a ``mix32``, which keeps the DARE kernels
close to memory speed. All arithmetic is on uint32 values held in int64 tensors.
"""

from __future__ import annotations

import torch

_M1, _M2 = 0x7FEB352D, 0x846CA68B
_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x · c) mod 2^32 without overflowing int64: split the constant into 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x):
    """lowbias32 on uint32 values (Python ints or int64 tensors)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def stream_keys(seed: int, model: int) -> tuple[int, int]:
    """The two per-model keys of the hash, from a 64-bit seed and the model's index."""
    seed &= (1 << 64) - 1
    m = mix32((model * 0x9E3779B9 + 0x632BE5AB) & _MASK32)
    return mix32((seed & _MASK32) ^ m), mix32(((seed >> 32) ^ mix32(m ^ 0x5BD1E995)) & _MASK32)


def keep_threshold(p: float) -> int:
    """p16 of DARE's keep test, for a keep probability p in [0, 1]."""
    return min(1 << 16, max(0, int(p * (1 << 16))))


def _hash(c, s1: int, s2: int):
    return mix32((c & _MASK32) ^ s1 ^ mix32((c >> 32) ^ s2))


def uniform24(numel: int, seed: int, model: int, device=None) -> torch.Tensor:
    """DELLA's 24-bit draw (hash(j) >> 8) of every element, int64 [numel]."""
    j = torch.arange(numel, dtype=torch.int64, device=device)
    return _hash(j, *stream_keys(seed, model)) >> 8


def uniform16(numel: int, seed: int, model: int, device=None) -> torch.Tensor:
    """DARE's 16-bit draw of every element, int64 [numel]: a half of hash((j >> 4)·8 + (j & 7))."""
    j = torch.arange(numel, dtype=torch.int64, device=device)
    h = _hash(((j >> 4) << 3) | (j & 7), *stream_keys(seed, model))
    return torch.where((j & 8) != 0, h >> 16, h & 0xFFFF)


def random_keep_mask(shape, p: float, seed: int, model: int, device=None) -> torch.Tensor:
    """DARE's bool mask: element kept with probability p (exactly reproducible from seed and model index)."""
    numel = 1
    for s in shape:
        numel *= s
    return (uniform16(numel, seed, model, device) < keep_threshold(p)).view(shape)
