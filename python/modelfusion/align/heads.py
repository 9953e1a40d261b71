"""Attention heads under permutation: a layer's Q, K, V and O permutations are chosen together
as one structured choice (KV heads, query heads within their group, head dimensions) so that
the permuted layer computes the same function; :func:`expand` turns a choice into gather indices."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadGroup:
    """One attention layer: the spec's permutations ``q``, ``k``, ``v``, ``o`` (names in
    ``spec.axes``) are expanded from a structured choice (see :func:`expand`)."""

    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool


@dataclass
class HeadChoice:
    kv: torch.Tensor  # [kv_heads]: old KV head in each new slot
    query: torch.Tensor  # [kv_heads, g]: old query head (within its group) in each new position
    qk: torch.Tensor  # [kv_heads, head_dim]: old Q/K dimension at each new one, per new KV slot
    vo: torch.Tensor  # [kv_heads, head_dim]: old V/O dimension at each new one


def expand(group: HeadGroup, choice: HeadChoice) -> dict[str, torch.Tensor]:
    """The full-size gather indices of Q, K, V rows and O columns for a structured choice."""
    d, g = group.head_dim, group.heads // group.kv_heads
    old_kv = choice.kv[:, None]  # [kv, 1]
    k = (old_kv * d + choice.qk).reshape(-1)
    v = (old_kv * d + choice.vo).reshape(-1)
    old_q = old_kv * g + choice.query  # [kv, g]
    q = (old_q[:, :, None] * d + choice.qk[:, None, :]).reshape(-1)
    o = (old_q[:, :, None] * d + choice.vo[:, None, :]).reshape(-1)
    return {group.q: q, group.k: k, group.v: v, group.o: o}


def identity_choice(group: HeadGroup) -> HeadChoice:
    kv, g, d = group.kv_heads, group.heads // group.kv_heads, group.head_dim
    return HeadChoice(
        torch.arange(kv), torch.arange(g).repeat(kv, 1), torch.arange(d).repeat(kv, 1), torch.arange(d).repeat(kv, 1)
    )


def random_choice(group: HeadGroup, generator: torch.Generator) -> HeadChoice:
    kv, g, d = group.kv_heads, group.heads // group.kv_heads, group.head_dim

    def rows(n, size):
        return torch.stack([torch.randperm(size, generator=generator) for _ in range(n)])

    qk = torch.arange(d).repeat(kv, 1) if group.rope else rows(kv, d)
    return HeadChoice(torch.randperm(kv, generator=generator), rows(kv, g), qk, rows(kv, d))
