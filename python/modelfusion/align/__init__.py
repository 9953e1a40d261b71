"""Alignment of independently trained models before merging: permutation specs (MLPs, traced
networks, BERT/Llama), weight and activation matching, Sinkhorn re-basin, the straight-through
estimator, OT fusion, REPAIR."""

from .heads import HeadGroup
from .matching import MatchResult, activation_matching, align_to_reference, local_keys, weight_matching
from .repair import endpoint_moments, repair, reset_bn
from .soft import hard_round, ot_fusion, ot_transport, sinkhorn_rebasin, soft_apply, ste_matching
from .spec import PermutationSpec, apply_perms, identity_perms, mlp_spec, random_perms, spec_from_fx
from .transformers import bert_spec, llama_spec

__all__ = [
    "HeadGroup",
    "MatchResult",
    "PermutationSpec",
    "activation_matching",
    "align_to_reference",
    "apply_perms",
    "hard_round",
    "bert_spec",
    "endpoint_moments",
    "identity_perms",
    "llama_spec",
    "local_keys",
    "mlp_spec",
    "ot_fusion",
    "ot_transport",
    "random_perms",
    "repair",
    "reset_bn",
    "sinkhorn_rebasin",
    "soft_apply",
    "spec_from_fx",
    "ste_matching",
    "weight_matching",
]
