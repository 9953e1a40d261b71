"""Name-aligned state dicts: what every model-level merge in this package reads and returns.

Policy, for models given as ``nn.Module``s or state dicts (``{name: tensor}``):

- every model must have exactly the reference model's keys and shapes (else :class:`StateDictError`
  naming the model, the keys and the shapes);
- floating-point tensors are merged in the reference's dtype (others are converted to it);
- integer and bool tensors (``num_batches_tracked``, ``position_ids``, masks) are not averaged:
  the reference's value is kept;
- tied tensors (one storage under several names in the reference) are merged once, and the
  result is shared by the same names again.

The reference is the base model where a method has one, else the first model. Results are new
tensors; no input is modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import StateDictError

StateLike = Mapping[str, torch.Tensor] | nn.Module
State = dict[str, torch.Tensor]


def state_of(model: StateLike, name: str = "model") -> State:
    """The tensors of a module (parameters and persistent buffers, detached) or a state dict."""
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, Mapping):
        for key, value in model.items():
            if not isinstance(value, torch.Tensor):
                raise StateDictError(f"{name}[{key!r}]: expected a tensor, got {type(value).__name__}")
        return dict(model)
    raise StateDictError(f"{name}: expected an nn.Module or a state dict, got {type(model).__name__}")


def _listing(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def aligned(models: Sequence[StateLike], names: Sequence[str]) -> list[State]:
    """The state dicts of ``models``, checked key by key and shape by shape against the first."""
    if len(models) == 0:
        raise StateDictError(f"{names[0] if names else 'models'}: expected at least one model, got none")
    states = [state_of(m, n) for m, n in zip(models, names, strict=True)]
    ref, ref_name = states[0], names[0]
    for state, name in zip(states[1:], names[1:], strict=True):
        missing, extra = ref.keys() - state.keys(), state.keys() - ref.keys()
        if missing or extra:
            parts = ([f"missing {_listing(missing)}"] if missing else []) + (
                [f"unexpected {_listing(extra)}"] if extra else []
            )
            raise StateDictError(f"{name}: keys differ from {ref_name}'s: {'; '.join(parts)}")
        for key, tensor in ref.items():
            if state[key].shape != tensor.shape:
                raise StateDictError(
                    f"{name}[{key!r}]: expected shape {tuple(tensor.shape)} (as in {ref_name}), "
                    f"got {tuple(state[key].shape)}"
                )
    return states


def _tie_groups(state: State) -> dict[str, str]:
    """name -> the first name sharing its storage, shape and strides (tied weights)."""
    first: dict[tuple, str] = {}
    owner = {}
    for key, t in state.items():
        if t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        owner[key] = first.setdefault(ident, key)
    return owner


def merge_states(
    states: Sequence[State],
    merge: Callable[[str, list[torch.Tensor]], torch.Tensor],
    reference: int = 0,
) -> State:
    """``{name: merge(name, tensors)}`` over floating-point tensors (in the reference's dtype,
    contiguous); other tensors copied from ``states[reference]``; tied names share one result."""
    ref = states[reference]
    owners = _tie_groups(ref)
    out: State = {}
    for key, tensor in ref.items():
        owner = owners.get(key, key)
        if owner != key:
            out[key] = out[owner]
        elif tensor.is_floating_point():
            inputs = [s[key].to(dtype=tensor.dtype, device=tensor.device).contiguous() for s in states]
            out[key] = merge(key, inputs)
        else:
            out[key] = tensor.clone()
    return out


def merge_into(
    target: State,
    states: Sequence[State],
    merge: Callable[[str, list[torch.Tensor], torch.Tensor], object],
) -> None:
    """In place: ``merge(name, tensors, out)`` writes each floating-point tensor of ``target``
    (other tensors stay as they are; tied names are merged once). ``target`` may be one of
    ``states``: the merges are elementwise, each element read before it is written, so an output
    that is exactly one of its inputs is safe. Where the inputs differ from the output in dtype,
    device or layout, the merge goes through a new tensor that is then copied in."""
    owners = _tie_groups(target)
    for key, out in target.items():
        if owners.get(key, key) != key or not out.is_floating_point():
            continue
        inputs = [s[key] for s in states]
        if out.is_contiguous() and all(
            x.dtype == out.dtype and x.device == out.device and x.is_contiguous() for x in inputs
        ):
            merge(key, inputs, out)
        else:
            fresh = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            merge(key, [x.to(dtype=out.dtype, device=out.device).contiguous() for x in inputs], fresh)
            out.copy_(fresh)


def load_merged(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``template`` holding ``state`` (the template is left as it is)."""
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model
