"""Triton ``sparse_merge`` (TIES, DARE, breadcrumbs) and ``magnitude_prune``.

Selection: an element's key is the bit pattern of |τ| in float32 (τ = x − base, or x), which
orders magnitudes like the reference (NaN above +inf). The k-th largest key comes from two
histogram passes (the high 16 bits, then the low 16 bits inside the chosen bucket); ties at it are
kept lowest flat index first, by ranking equal keys with a per-block count, its prefix sum and a
cumulative sum inside the block. The merge is one launch over all models. Semantics:
:mod:`fusion_kernels.reference.sparse_merge`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.random_mask import keep_threshold, stream_keys
from ..reference.sparse_merge import L1_RESCALE_EPS, PRUNE_OPTIONS, threshold_key
from ._launch import BLOCK, grid, offsets, store_rounded

KEEP_ALL, KEEP_TOPK, KEEP_RANDOM, KEEP_MASK, KEEP_BAND = 0, 1, 2, 3, 4
NO_KEY = 1 << 31  # above every key: keeps nothing
ALL_KEYS = -1  # below every key: keeps everything


@triton.jit
def _tau(x, base, offs, mask, HAS_BASE: tl.constexpr):
    t = tl.load(x + offs, mask=mask, other=0).to(tl.float32)
    if HAS_BASE:
        t = t - tl.load(base + offs, mask=mask, other=0).to(tl.float32)
    return t


@triton.jit
def _key(t):
    return t.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _histogram_kernel(x, base, hist, numel, prefix, HIGH: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """HIGH: count keys by their high 16 bits; else count the low 16 bits of keys whose high bits are ``prefix``."""
    offs, mask = offsets(numel, BLOCK)
    key = _key(_tau(x, base, offs, mask, HAS_BASE))
    if HIGH:
        tl.atomic_add(hist + (key >> 16), 1, mask=mask)
    else:
        tl.atomic_add(hist + (key & 0xFFFF), 1, mask=mask & ((key >> 16) == prefix))


@triton.jit
def _equal_count_kernel(x, base, counts, numel, t, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = offsets(numel, BLOCK)
    equal = mask & (_key(_tau(x, base, offs, mask, HAS_BASE)) == t)
    tl.store(counts + tl.program_id(0), tl.sum(equal.to(tl.int64), axis=0))


def _bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(b, above): the bucket holding the k-th largest key and the count of keys in higher buckets."""
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # keys in buckets > b
    b = int(torch.nonzero((above < k) & (above + hist >= k))[0])
    return b, int(above[b])


def select(base: torch.Tensor | None, x: torch.Tensor, k: int) -> tuple[int, int]:
    """(t, cut): keep keys > t and the first ``cut`` (by flat index) equal to t: the k largest |τ|."""
    n = x.numel()
    if k <= 0:
        return NO_KEY, 0
    if k >= n:
        return ALL_KEYS, 0
    has_base = base is not None
    hist = torch.zeros(1 << 16, dtype=torch.int32, device=x.device)
    _histogram_kernel[grid(n)](x, base if has_base else x, hist, n, 0, HIGH=True, HAS_BASE=has_base, BLOCK=BLOCK)
    high, above_high = _bucket(hist.long(), k)
    hist.zero_()
    _histogram_kernel[grid(n)](x, base if has_base else x, hist, n, high, HIGH=False, HAS_BASE=has_base, BLOCK=BLOCK)
    low, above_low = _bucket(hist.long(), k - above_high)
    return (high << 16) | low, k - above_high - above_low


def _equal_prefix(base, x, t: int, cut: int) -> torch.Tensor:
    """Per block, how many keys equal to t come before it (only needed when some are kept)."""
    blocks = grid(x.numel())[0]
    counts = torch.zeros(blocks, dtype=torch.int64, device=x.device)
    if cut > 0:
        has_base = base is not None
        _equal_count_kernel[(blocks,)](x, base if has_base else x, counts, x.numel(), t, HAS_BASE=has_base, BLOCK=BLOCK)
    return torch.cumsum(counts, 0) - counts


@triton.jit
def _in_top(key, t, cut, prefix, offs, mask):
    equal = mask & (key == t)
    rank = tl.load(prefix + tl.program_id(0)) + tl.cumsum(equal.to(tl.int64), axis=0) - 1
    return (key > t) | (equal & (rank < cut))


@triton.jit
def _mix32(h):
    """lowbias32 on uint32 values held in int64 (products are taken mod 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit
def _keep(t, offs, mask, i, MODE: tl.constexpr, rules):
    """Which elements model i keeps. rules: (hi_t, hi_cut, hi_prefix, lo_t, lo_cut, lo_prefix, s1, s2, p16, masks)."""
    if MODE == 1:  # top-k
        return _in_top(_key(t), rules[0][i], rules[1][i], rules[2][i], offs, mask)
    elif MODE == 4:  # band: in the top (drop + keep) but not in the top drop
        key = _key(t)
        top = _in_top(key, rules[0][i], rules[1][i], rules[2][i], offs, mask)
        return top & ~_in_top(key, rules[3][i], rules[4][i], rules[5][i], offs, mask)
    elif MODE == 2:  # random: a 16-bit half of the counter-based hash of (seed, model, element group)
        c = ((offs >> 4) << 3) | (offs & 7)
        h = _mix32((c & 0xFFFFFFFF) ^ rules[6][i] ^ _mix32((c >> 32) ^ rules[7][i]))
        return tl.where((offs & 8) != 0, h >> 16, h & 0xFFFF) < rules[8][i]
    elif MODE == 3:  # explicit masks
        return tl.load(rules[9][i] + offs, mask=mask, other=0) != 0
    else:
        return offs >= 0


@triton.jit
def _kept(x, base, offs, mask, i, scale, DIVIDE: tl.constexpr, HAS_BASE: tl.constexpr, MODE: tl.constexpr, rules):
    """(kept and rescaled τ, τ, keep) of model i."""
    t = _tau(x, base, offs, mask, HAS_BASE)
    keep = _keep(t, offs, mask, i, MODE, rules)
    scaled = t / scale if DIVIDE else t * scale
    return tl.where(keep, scaled, 0.0), t, keep


@triton.jit
def _sparse_merge_kernel(
    out,
    base,
    xs,
    ws,
    scales,
    rules,
    weight_total,
    lam,
    numel,
    N: tl.constexpr,
    MODE: tl.constexpr,
    HAS_BASE: tl.constexpr,
    DIVIDE: tl.constexpr,
    CONSENSUS: tl.constexpr,  # 0 none, 1 sum, 2 count
    WEIGHTED: tl.constexpr,  # elect on weighted votes
    COMBINE: tl.constexpr,  # 0 sum, 1 mean_count, 2 mean_weight
    TIE_UP: tl.constexpr,  # a zero tally elects +
    BLOCK: tl.constexpr,
):
    offs, mask = offsets(numel, BLOCK)
    merged = tl.zeros((BLOCK,), dtype=tl.float32)
    tally = tl.zeros((BLOCK,), dtype=tl.float32)
    agreeing = tl.zeros((BLOCK,), dtype=tl.float32) + N
    agreeing_w = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(N):
        k, _, _ = _kept(xs[i], base, offs, mask, i, scales[i], DIVIDE, HAS_BASE, MODE, rules)
        if CONSENSUS == 0:
            merged += k * ws[i]
        else:
            vote = k * ws[i] if WEIGHTED else k
            if CONSENSUS == 2:
                tally += tl.where(vote > 0, 1.0, 0.0) - tl.where(vote < 0, 1.0, 0.0)
            else:
                tally += vote
    if CONSENSUS != 0:  # second pass: the models agreeing with the elected sign (a zero never agrees)
        elected = tl.where(tally >= 0, 1.0, -1.0) if TIE_UP else tl.where(tally > 0, 1.0, -1.0)
        agreeing = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(N):
            k, _, _ = _kept(xs[i], base, offs, mask, i, scales[i], DIVIDE, HAS_BASE, MODE, rules)
            vote = k * ws[i] if WEIGHTED else k
            agree = vote * elected > 0
            merged += tl.where(agree, k * ws[i], 0.0)
            agreeing += tl.where(agree, 1.0, 0.0)
            agreeing_w += tl.where(agree, ws[i], 0.0)
    if COMBINE == 1:
        merged = merged / tl.maximum(agreeing, 1.0)
    elif COMBINE == 2:
        divisor = agreeing_w if CONSENSUS != 0 else tl.zeros((BLOCK,), dtype=tl.float32) + weight_total
        merged = merged / tl.where(divisor == 0, 1.0, divisor)
    merged = merged * lam
    if HAS_BASE:
        merged = tl.load(base + offs, mask=mask, other=0).to(tl.float32) + merged
    store_rounded(out, offs, merged, mask)


@triton.jit
def _l1_kernel(x, base, sums, rules, numel, i, MODE: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: Σ|τ| and Σ over kept elements of |τ| (summed in float64 on the host, in block order)."""
    offs, mask = offsets(numel, BLOCK)
    _, t, keep = _kept(x, base, offs, mask, i, 1.0, False, HAS_BASE, MODE, rules)
    a = tl.where(mask, tl.abs(t), 0.0)
    pid = tl.program_id(0)
    tl.store(sums + 2 * pid, tl.sum(a, axis=0))
    tl.store(sums + 2 * pid + 1, tl.sum(tl.where(keep & mask, a, 0.0), axis=0))


MAX_DELLA_COLS = 1 << 16
DELLA_TILE = 4096  # elements one program ranks: short rows are ranked several to a program


@triton.jit
def _della_kernel(
    xs, base, masks, low, spread, s1, s2, rows, cols, HAS_BASE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    """ROWS rows of model i: rank |τ| along each row (ascending, ties by index) with one sort of
    (key << 32 | column), then keep rank r with probability low + spread·r/(cols − 1) by the hash."""
    i = tl.program_id(1)
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)[:, None]
    col = tl.arange(0, BLOCK).to(tl.int64)[None, :]
    inside = (row < rows) & (col < cols)
    t = _tau(xs[i], base, row * cols + col, inside, HAS_BASE)
    packed = tl.where(inside, (_key(t).to(tl.int64) << 32) | col, 0x7FFFFFFFFFFFFFFF)
    order = tl.sort(packed, dim=1)  # position along the row = rank
    j = row * cols + (order & 0xFFFFFFFF)
    last = tl.maximum(cols - 1, 1).to(tl.float32)
    rank_norm = tl.where(cols > 1, tl.math.div_rn(col.to(tl.float32), last), 0.0)
    p = low[i] + rank_norm * spread[i]
    inner = _mix32((j >> 32) ^ s2[i])
    h = _mix32((j & 0xFFFFFFFF) ^ s1[i] ^ inner)
    keep = (h >> 8).to(tl.float32) < tl.floor(p * 16777216.0)
    tl.store(masks + i.to(tl.int64) * (rows * cols) + j, keep.to(tl.int8), mask=inside)


def della_masks(base, xs, densities, epsilons, seed, first_model=0) -> list[torch.Tensor]:
    """Each model's DELLA keep mask (bool like xs[0]), ranked along rows (a 1-D tensor is one row)."""
    n, shape = len(xs), xs[0].shape
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    masks = torch.zeros((n, *shape), dtype=torch.bool, device=xs[0].device)
    if masks.numel():
        f32 = [
            torch.tensor([d - e, 2 * e], dtype=torch.float32).tolist() for d, e in zip(densities, epsilons, strict=True)
        ]
        keys = [stream_keys(seed, first_model + i) for i in range(n)]
        block = triton.next_power_of_2(cols)
        tile_rows = min(triton.next_power_of_2(rows), max(1, DELLA_TILE // block))
        _della_kernel[(triton.cdiv(rows, tile_rows), n)](
            tuple(xs),
            base if base is not None else xs[0],
            masks.view(torch.int8),
            tuple(lo for lo, _ in f32),
            tuple(sp for _, sp in f32),
            tuple(k[0] for k in keys),
            tuple(k[1] for k in keys),
            rows,
            cols,
            HAS_BASE=base is not None,
            ROWS=tile_rows,
            BLOCK=block,
        )
    return list(masks.unbind(0))


def declines(base, xs, weights, sparsify, rescale, consensus, elect_on, combine, *rest) -> str | None:
    tie_sign, masks = rest[-3], rest[-1]
    if combine == "max" or tie_sign == 0:
        return "combine='max' and tie_sign=0 run on 'torch' (the Triton kernel sums the agreeing)"
    if sparsify != "della" or masks:
        return None
    if rescale == "inverse_density":
        return "della with rescale='inverse_density' divides by per-element probabilities (runs on 'torch')"
    if xs[0].dim() not in (1, 2) or xs[0].shape[-1] > MAX_DELLA_COLS:
        return f"della's Triton ranking takes 1-D and 2-D tensors of at most {MAX_DELLA_COLS} columns"
    return None


def _rules(base, xs, sparsify, densities, gammas, seed, masks, ks, thresholds, first_model):
    """(mode, rules tuple) of the merge kernel for every model."""
    n, numel = len(xs), xs[0].numel()
    hi, lo = [(ALL_KEYS, 0)] * n, [(NO_KEY, 0)] * n
    keys, p16 = [(0, 0)] * n, [0] * n
    if masks:
        mode = KEEP_MASK
    elif sparsify in ("magnitude", "magnitude_outliers"):
        keep = list(ks) if ks is not None else [int(d * numel) for d in densities]
        drop = [0] * n
        if sparsify == "magnitude_outliers":
            drop = [min(int(g * numel), numel - k) for g, k in zip(gammas, keep, strict=True)]
        hi = [select(base, x, d + k) for x, d, k in zip(xs, drop, keep, strict=True)]
        lo = [select(base, x, d) for x, d in zip(xs, drop, strict=True)]
        mode = KEEP_BAND if sparsify == "magnitude_outliers" else KEEP_TOPK
    elif sparsify == "threshold":  # key >= the threshold's: key > it - 1, no index cut
        hi = [(threshold_key(t, x.dtype, keys16=False) - 1, 0) for x, t in zip(xs, thresholds, strict=True)]
        mode = KEEP_TOPK
    elif sparsify == "random":
        mode = KEEP_RANDOM
        keys = [stream_keys(seed, first_model + i) for i in range(n)]
        p16 = [keep_threshold(d) for d in densities]
    else:
        mode = KEEP_ALL
    prefix = [_equal_prefix(base, x, t, cut) for x, (t, cut) in zip(xs, hi, strict=True)]
    lo_prefix = [_equal_prefix(base, x, t, cut) for x, (t, cut) in zip(xs, lo, strict=True)]
    rules = (
        tuple(t for t, _ in hi),
        tuple(c for _, c in hi),
        tuple(prefix),
        tuple(t for t, _ in lo),
        tuple(c for _, c in lo),
        tuple(lo_prefix),
        tuple(k[0] for k in keys),
        tuple(k[1] for k in keys),
        tuple(p16),
        tuple(masks) if masks else tuple(xs),
    )
    return mode, rules


def _l1_scales(base, xs, mode, rules) -> list[float]:
    """mergekit's L1 rescale per model: ‖τ‖₁ / ‖kept τ‖₁ (1 where either is below 1e-7)."""
    has_base, numel = base is not None, xs[0].numel()
    scales = []
    for i, x in enumerate(xs):
        sums = torch.zeros(grid(numel)[0], 2, dtype=torch.float32, device=x.device)
        if numel:
            _l1_kernel[grid(numel)](
                x, base if has_base else x, sums, rules, numel, i, MODE=mode, HAS_BASE=has_base, BLOCK=BLOCK
            )
        before, after = sums.double().sum(0).tolist()
        scales.append(before / after if before >= L1_RESCALE_EPS and after >= L1_RESCALE_EPS else 1.0)
    return scales


def sparse_merge(
    out,
    base,
    xs,
    weights,
    sparsify,
    rescale,
    consensus,
    elect_on,
    combine,
    densities,
    gammas,
    epsilons,
    lam,
    seed,
    thresholds,
    tie_sign,
    first_model,
    masks,
    ks=None,
):
    """The ops-layer implementation (same arguments as the cpu backend's; "" stands for None)."""
    n, numel = len(xs), out.numel()
    if sparsify == "della" and not masks:
        masks = della_masks(base, xs, densities, epsilons, seed, first_model)
    mode, rules = _rules(base, xs, sparsify or None, densities, gammas, seed, masks, ks, thresholds, first_model)
    scales, divide = [1.0] * n, False
    if rescale == "inverse_density" and (sparsify or masks):
        scales, divide = list(densities), True
    elif rescale == "l1":
        scales = _l1_scales(base, xs, mode, rules)
    total = sum(weights)
    if numel:
        _sparse_merge_kernel[grid(numel)](
            out,
            base if base is not None else xs[0],
            tuple(xs),
            tuple(weights),
            tuple(scales),
            rules,
            total if abs(total) >= 1e-8 else 1.0,
            lam,
            numel,
            N=n,
            MODE=mode,
            HAS_BASE=base is not None,
            DIVIDE=divide,
            CONSENSUS={"": 0, "sum": 1, "count": 2}[consensus or ""],
            WEIGHTED=elect_on == "weighted",
            COMBINE={"sum": 0, "mean_count": 1, "mean_weight": 2}[combine],
            TIE_UP=tie_sign > 0,
            BLOCK=BLOCK,
        )


def magnitude_prune(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    sparse_merge(out, None, [x], *PRUNE_OPTIONS, ks=[k])


def magnitude_threshold(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    """The k-th largest |x| (1 <= k <= numel): the selected key read back as float32, exact in x's dtype."""
    if k < x.numel():
        key = torch.tensor([select(None, x, k)[0]], dtype=torch.int32)
    else:  # the smallest key (a NaN key is the largest, so NaNs elsewhere do not leak in)
        key = x.float().abs().reshape(-1).view(torch.int32).amin().reshape(1)
    out.copy_(key.view(torch.float32)[0])
