"""Permutation specs: which axes of which tensors share one permutation of hidden units.

A network's function is unchanged when the units of a hidden layer are permuted consistently: the
rows of the layer that produces them, the columns of every layer that reads them, and every
per-unit tensor in between (biases, norm weights, BatchNorm statistics). A :class:`PermutationSpec`
names each such permutation and lists its ``(tensor name, axis)`` pairs. Specs come from
:func:`mlp_spec`, or :func:`spec_from_fx` for networks built from standard modules (MLPs, VGG-style
CNNs, ResNets with residual additions sharing one permutation).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn

import fusion_kernels as fk

from ..errors import StateDictError
from .heads import expand, random_choice

Perms = dict[str, torch.Tensor]


@dataclass
class PermutationSpec:
    """``axes[p]``: the (tensor, axis) pairs permuted by permutation ``p``, all of one size.
    ``sites[p]``: a module whose output carries p's units on its feature axis (for activation
    statistics; post-nonlinearity where there is one), ``pre_sites[p]``: the layer producing them."""

    axes: dict[str, list[tuple[str, int]]]
    sites: dict[str, str] = field(default_factory=dict)
    pre_sites: dict[str, str] = field(default_factory=dict)
    heads: dict = field(default_factory=dict)  # name -> heads.HeadGroup: q/k/v/o perms chosen together

    def head_members(self) -> set[str]:
        return {getattr(g, t) for g in self.heads.values() for t in "qkvo"}

    def sizes(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        out = {}
        for p, pairs in self.axes.items():
            sizes = {state[k].shape[a] for k, a in pairs}
            if len(sizes) != 1:
                raise StateDictError(f"permutation {p!r}: its axes have different sizes {sorted(sizes)}: {pairs}")
            out[p] = sizes.pop()
        return out

    def by_tensor(self) -> dict[str, dict[int, str]]:
        """tensor name -> {axis: permutation name}."""
        table: dict[str, dict[int, str]] = {}
        for p, pairs in self.axes.items():
            for key, axis in pairs:
                if axis in table.setdefault(key, {}):
                    raise StateDictError(f"{key!r} axis {axis} belongs to two permutations")
                table[key][axis] = p
        return table

    def check(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, _ in (pair for pairs in self.axes.values() for pair in pairs):
            if key not in state:
                raise StateDictError(f"spec: tensor {key!r} is not in the state dict")
        self.sizes(state)


def identity_perms(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> Perms:
    return {p: torch.arange(n) for p, n in spec.sizes(state).items()}


def random_perms(spec: PermutationSpec, state: Mapping[str, torch.Tensor], seed: int = 0) -> Perms:
    """Uniform permutations; attention layers get random structured choices (legal ones only)."""
    g = torch.Generator().manual_seed(seed)
    members = spec.head_members()
    perms = {p: torch.randperm(n, generator=g) for p, n in spec.sizes(state).items() if p not in members}
    for group in spec.heads.values():
        perms.update(expand(group, random_choice(group, g)))
    return perms


def apply_perms(
    spec: PermutationSpec, perms: Perms, state: Mapping[str, torch.Tensor], *, inverse: bool = False
) -> dict[str, torch.Tensor]:
    """The state with unit ``i`` of each permuted axis taken from unit ``perms[p][i]`` (one
    ``fusion_kernels.permute_many`` call); tensors outside the spec are returned as they are, and
    ``state`` may hold a part of the spec's tensors (a rank's share)."""
    table = spec.by_tensor()
    specs = {key: {axis: perms[p] for axis, p in table[key].items()} for key in state if key in table}
    return fk.permute_many(dict(state), specs, inverse=inverse)


def mlp_spec(linears: list[str], activations: list[str] | None = None) -> PermutationSpec:
    """Spec of a chain of ``nn.Linear`` layers (names in order): the outputs of all but the last
    are permuted. ``activations[i]`` (optional) names the module after layer i, for statistics."""
    axes, sites, pre = {}, {}, {}
    for i, (a, b) in enumerate(zip(linears[:-1], linears[1:], strict=True)):
        p = f"P_{a}"
        axes[p] = [(f"{a}.weight", 0), (f"{a}.bias", 0), (f"{b}.weight", 1)]
        pre[p] = a
        sites[p] = activations[i] if activations else a
    return PermutationSpec(axes, sites, pre)


FEATURE_WISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
UNIT_PRESERVING = (
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)
ELEMENTWISE_FUNCTIONS = {torch.relu, torch.tanh, torch.sigmoid, nn.functional.relu, nn.functional.gelu}


class _Groups:
    """Union-find over unit groups; a group joined with FIXED is never permuted."""

    FIXED = "__fixed__"

    def __init__(self):
        self.parent = {self.FIXED: self.FIXED}
        self.count = 0

    def new(self) -> str:
        self.count += 1
        g = f"g{self.count}"
        self.parent[g] = g
        return g

    def find(self, g: str) -> str:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb == self.FIXED:
            ra, rb = rb, ra
        self.parent[rb] = ra
        return ra


def spec_from_fx(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Trace ``model`` with ``torch.fx`` and derive its spec.

    Understood: ``nn.Linear`` and ``nn.Conv2d`` (new units on their output), feature-wise norms
    (BatchNorm, LayerNorm: their parameters and statistics follow the units), unit-preserving
    modules (activations, dropout, pooling), ``flatten`` after pooling to 1×1, and residual
    additions (both operands share one permutation). The network's input and output units are
    never permuted; anything else a unit group flows into fixes that group.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    traced = fx.symbolic_trace(model)
    ShapeProp(traced).propagate(example_input)
    modules = dict(traced.named_modules())
    groups = _Groups()
    out_group: dict[fx.Node, str] = {}
    members: list[tuple[str, str, int]] = []  # (group, tensor, axis)
    producer: dict[str, str] = {}
    site: dict[str, str] = {}

    def group_of(arg) -> str:
        return out_group.get(arg, groups.FIXED) if isinstance(arg, fx.Node) else groups.FIXED

    def flattened(source) -> str:
        """Flattening keeps the units only when nothing but them is left (1×1 spatial size)."""
        shape = source.meta["tensor_meta"].shape if isinstance(source, fx.Node) else None
        if shape is not None and len(shape) > 2 and int(torch.Size(shape[2:]).numel()) == 1:
            return group_of(source)
        groups.union(group_of(source), groups.FIXED)
        return groups.FIXED

    for node in traced.graph.nodes:
        if node.op == "placeholder":
            out_group[node] = groups.FIXED
        elif node.op == "call_module":
            m = modules[node.target]
            g_in = group_of(node.args[0])
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if isinstance(m, nn.Conv2d) and m.groups != 1:
                    groups.union(g_in, groups.FIXED)
                    out_group[node] = groups.FIXED
                    continue
                g = groups.new()
                members += [(g_in, f"{node.target}.weight", 1), (g, f"{node.target}.weight", 0)]
                if m.bias is not None:
                    members.append((g, f"{node.target}.bias", 0))
                producer[g] = site[g] = node.target
                out_group[node] = g
            elif isinstance(m, FEATURE_WISE):
                for name, _ in [*m.named_parameters(), *m.named_buffers()]:
                    if name != "num_batches_tracked":
                        members.append((g_in, f"{node.target}.{name}", 0))
                out_group[node] = g_in
                site[g_in] = node.target
            elif isinstance(m, nn.Flatten):
                out_group[node] = flattened(node.args[0])
            elif isinstance(m, UNIT_PRESERVING):
                out_group[node] = g_in
                site[g_in] = node.target
            else:
                for arg in node.all_input_nodes:
                    groups.union(group_of(arg), groups.FIXED)
                out_group[node] = groups.FIXED
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            a, b = node.args[0], node.args[1]
            if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                out_group[node] = groups.union(group_of(a), group_of(b))
            else:
                out_group[node] = group_of(a if isinstance(a, fx.Node) else b)
        elif node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
            out_group[node] = group_of(node.args[0])
        elif node.op in ("call_function", "call_method") and node.target in (
            torch.flatten,
            "flatten",
            "view",
            "reshape",
        ):
            out_group[node] = flattened(node.args[0])
        else:  # output, getattr, unknown functions: their operands' units are fixed
            for arg in node.all_input_nodes:
                groups.union(group_of(arg), groups.FIXED)
            out_group[node] = groups.FIXED
    axes: dict[str, list[tuple[str, int]]] = {}
    names: dict[str, str] = {}
    sites, pre = {}, {}
    for g, key, axis in members:
        root = groups.find(g)
        if root == groups.FIXED:
            continue
        if root not in names:
            names[root] = f"P{len(names)}"
        axes.setdefault(names[root], []).append((key, axis))
    for g in producer:
        root = groups.find(g)
        if root in names:
            pre.setdefault(names[root], producer[g])
            sites.setdefault(names[root], site.get(g, producer[g]))
    return PermutationSpec(axes, sites, pre)
