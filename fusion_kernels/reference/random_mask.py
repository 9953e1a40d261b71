"""Counter-based random keep masks (DARE, DELLA): reproducible on every backend and thread count.

For model ``i`` and flat element index ``j``:

    s1, s2 = stream_keys(seed, i)                  (per-model keys, computed once)
    h      = mix32(lo32(j) ^ s1 ^ mix32(hi32(j) ^ s2))
    keep   = (h >> 8) < p24,   p24 = floor(p · 2^24)

``mix32`` is the "lowbias32" integer finaliser (Wellons); 24 bits give keep probabilities in steps
of 2^-24. Below 2^32 elements the inner term is one constant per model, so an element costs one
``mix32`` (two multiplies), which keeps the DARE kernels memory-bound. All arithmetic is on uint32
values held in int64 tensors.
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
    """p24 for a keep probability p in [0, 1]."""
    return min(1 << 24, max(0, int(p * (1 << 24))))


def uniform24(numel: int, seed: int, model: int, device=None) -> torch.Tensor:
    """The 24-bit draw (h >> 8) of every element, int64 [numel]."""
    s1, s2 = stream_keys(seed, model)
    j = torch.arange(numel, dtype=torch.int64, device=device)
    h = mix32((j & _MASK32) ^ s1 ^ mix32((j >> 32) ^ s2))
    return h >> 8


def random_keep_mask(shape, p: float, seed: int, model: int, device=None) -> torch.Tensor:
    """Bool mask: element kept with probability p (exactly reproducible from seed and model index)."""
    numel = 1
    for s in shape:
        numel *= s
    return (uniform24(numel, seed, model, device) < keep_threshold(p)).view(shape)
