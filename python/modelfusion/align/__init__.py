"""Alignment of independently trained models before merging: permutation specs, weight and
activation matching, REPAIR."""

from .matching import MatchResult, activation_matching, align_to_reference, weight_matching
from .repair import repair, reset_bn
from .spec import PermutationSpec, apply_perms, identity_perms, mlp_spec, random_perms, spec_from_fx

__all__ = [
    "MatchResult",
    "PermutationSpec",
    "activation_matching",
    "align_to_reference",
    "apply_perms",
    "identity_perms",
    "mlp_spec",
    "random_perms",
    "repair",
    "reset_bn",
    "spec_from_fx",
    "weight_matching",
]
