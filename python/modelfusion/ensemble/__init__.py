"""Output ensembles: many models, one prediction, each member run once per batch.

    logits: Σᵢ wᵢ·fᵢ(x)                 probs: Σᵢ wᵢ·softmax(fᵢ(x))
    vote:   Σᵢ wᵢ·onehot(argmax fᵢ(x))  (weighted votes per class; ties go to the lowest class)

Weights are normalised to sum to 1 (default: equal). Members are any modules returning
``[batch, classes]`` scores, fine-tuned experts or merged models alike (an ensemble of averaged
models: build the members with :func:`modelfusion.average.load_merged`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import fusion_kernels as fk

from ..errors import ParameterError

MODES = ("logits", "probs", "vote")


class Ensemble(nn.Module):
    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None, mode: str = "logits"):
        super().__init__()
        if len(members) == 0:
            raise ParameterError("members: expected at least one model, got none")
        if mode not in MODES:
            raise ParameterError(f"mode: expected one of {MODES}, got {mode!r}")
        w = [1.0] * len(members) if weights is None else [float(x) for x in weights]
        if len(w) != len(members) or any(x < 0 for x in w) or sum(w) <= 0:
            raise ParameterError(
                f"weights: expected {len(members)} non-negative numbers with a positive sum, got {weights!r}"
            )
        self.members = nn.ModuleList(members)
        self.weights = [x / sum(w) for x in w]
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The combined scores ``[batch, classes]`` (logits, probabilities or weighted votes)."""
        outputs = [member(x) for member in self.members]
        if self.mode == "probs":
            outputs = [torch.softmax(o.float(), dim=-1) for o in outputs]
        elif self.mode == "vote":
            outputs = [nn.functional.one_hot(o.argmax(-1), o.shape[-1]).float() for o in outputs]
        return fk.weighted_sum(outputs, self.weights)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class indices ``[batch]``."""
        return self(x).argmax(-1)
