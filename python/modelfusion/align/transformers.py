"""Permutation specs of Hugging Face transformers (BERT-style and Llama-style), head-aware.

Residual stream: one permutation of the hidden size for the whole model (embeddings, every norm,
every projection's input or output on the stream). MLP: one permutation of the intermediate size
per layer. Attention, per layer (:class:`HeadGroup`): a permutation of the key/value heads, of the
query heads within each KV group (grouped-query attention maps query head j to KV head j // g),
and within each head of dimensions shared by Q and K (identity under rotary embeddings: each pair
of dimensions rotates at its own frequency, so no other order keeps q·k) and of dimensions shared
by V and O. These expand to the full-size permutations of Q, K, V rows and O columns.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import StateDictError
from .heads import HeadGroup
from .spec import PermutationSpec


def _layer_count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    n = 0
    while pattern.format(n) in state:
        n += 1
    if n == 0:
        raise StateDictError(f"no tensor named like {pattern.format(0)!r}: not this architecture")
    return n


def bert_spec(state: Mapping[str, torch.Tensor], heads: int, prefix: str = "") -> PermutationSpec:
    """Spec of a Hugging Face ``BertModel`` state dict (``prefix``: e.g. ``"bert."`` inside a task model)."""
    p = prefix
    layers = _layer_count(state, p + "encoder.layer.{}.attention.self.query.weight")
    hidden = state[p + "embeddings.word_embeddings.weight"].shape[1]
    res = [(p + f"embeddings.{n}_embeddings.weight", 1) for n in ("word", "position", "token_type")]
    res += [(p + "embeddings.LayerNorm.weight", 0), (p + "embeddings.LayerNorm.bias", 0)]
    axes: dict[str, list[tuple[str, int]]] = {}
    heads_of: dict[str, HeadGroup] = {}
    for i in range(layers):
        L = p + f"encoder.layer.{i}."
        a = L + "attention."
        names = {t: f"A{i}.{t}" for t in "qkvo"}
        axes[names["q"]] = [(a + "self.query.weight", 0), (a + "self.query.bias", 0)]
        axes[names["k"]] = [(a + "self.key.weight", 0), (a + "self.key.bias", 0)]
        axes[names["v"]] = [(a + "self.value.weight", 0), (a + "self.value.bias", 0)]
        axes[names["o"]] = [(a + "output.dense.weight", 1)]
        heads_of[f"A{i}"] = HeadGroup(**names, heads=heads, kv_heads=heads, head_dim=hidden // heads, rope=False)
        res += [(a + f"self.{t}.weight", 1) for t in ("query", "key", "value")]
        res += [(a + "output.dense.weight", 0), (a + "output.dense.bias", 0)]
        res += [(a + "output.LayerNorm.weight", 0), (a + "output.LayerNorm.bias", 0)]
        axes[f"F{i}"] = [
            (L + "intermediate.dense.weight", 0),
            (L + "intermediate.dense.bias", 0),
            (L + "output.dense.weight", 1),
        ]
        res += [(L + "intermediate.dense.weight", 1), (L + "output.dense.weight", 0), (L + "output.dense.bias", 0)]
        res += [(L + "output.LayerNorm.weight", 0), (L + "output.LayerNorm.bias", 0)]
    if p + "pooler.dense.weight" in state:
        res.append((p + "pooler.dense.weight", 1))
    axes["R"] = [(k, ax) for k, ax in res if k in state]
    return PermutationSpec(axes, heads=heads_of)


def llama_spec(state: Mapping[str, torch.Tensor], heads: int, kv_heads: int, prefix: str = "model.") -> PermutationSpec:
    """Spec of a Hugging Face ``LlamaForCausalLM`` (or ``LlamaModel`` with ``prefix=""``) state dict:
    rotary embeddings, grouped-query attention, RMSNorm, gated MLP; ``lm_head`` reads the stream."""
    p = prefix
    layers = _layer_count(state, p + "layers.{}.self_attn.q_proj.weight")
    hidden = state[p + "embed_tokens.weight"].shape[1]
    head_dim = state[p + "layers.0.self_attn.q_proj.weight"].shape[0] // heads
    res = [(p + "embed_tokens.weight", 1), (p + "norm.weight", 0)]
    axes: dict[str, list[tuple[str, int]]] = {}
    heads_of: dict[str, HeadGroup] = {}
    for i in range(layers):
        L = p + f"layers.{i}."
        a = L + "self_attn."
        names = {t: f"A{i}.{t}" for t in "qkvo"}
        for t in "qkv":
            axes[names[t]] = [(a + f"{t}_proj.weight", 0)] + (
                [(a + f"{t}_proj.bias", 0)] if a + f"{t}_proj.bias" in state else []
            )
            res.append((a + f"{t}_proj.weight", 1))
        axes[names["o"]] = [(a + "o_proj.weight", 1)]
        res.append((a + "o_proj.weight", 0))
        heads_of[f"A{i}"] = HeadGroup(**names, heads=heads, kv_heads=kv_heads, head_dim=head_dim, rope=True)
        m = L + "mlp."
        axes[f"F{i}"] = [(m + "gate_proj.weight", 0), (m + "up_proj.weight", 0), (m + "down_proj.weight", 1)]
        res += [(m + "gate_proj.weight", 1), (m + "up_proj.weight", 1), (m + "down_proj.weight", 0)]
        res += [(L + "input_layernorm.weight", 0), (L + "post_attention_layernorm.weight", 0)]
    if "lm_head.weight" in state:  # tied or not: permuted like the embedding
        res.append(("lm_head.weight", 1))
    axes["R"] = res
    if hidden != state[p + "norm.weight"].shape[0]:
        raise StateDictError("llama_spec: the final norm does not match the hidden size")
    return PermutationSpec(axes, heads=heads_of)
