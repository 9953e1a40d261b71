"""Merged vocabularies: the output tokenizer of a recipe's ``tokenizer_source`` / ``tokenizer:``
block, and each model's embedding rows placed at the output's token ids (mergekit 0.1.5's rules).

For every output token, a model's row is its own row of that token; where the model lacks the token
(or the recipe forces another source), the row comes from, in order: the recipe's ``tokens:`` entry
(a model's row of the token, a model's row of another token, or zeros); the one model that has the
token; the base model, when it has the token; the mean over the models that have it; zeros when
none has it. Rows past the vocabulary (``pad_to_multiple_of``) hold the mean of the model's rows.

transformers (``pip install 'fusion-kernels[tokenizer]'``) is needed only when a recipe asks for a
tokenizer merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..errors import CheckpointError, RecipeError, short_repr
from .chat_templates import NAMED
from .writer import TOKENIZER_FILES

LOG = logging.getLogger(__name__)

# Tensors indexed by token id along dim 0 (input embeddings, LM heads and their biases), as
# mergekit's architectures mark them; a tensor is treated so only when its dim 0 is also the
# model's vocabulary size.
VOCABULARY_TENSOR = re.compile(
    r"(?:^|\.)(?:embed_tokens|lm_head|word_embeddings|wte|embed_out|embed_in)\.(?:weight|bias)$"
)


@dataclass(frozen=True)
class TokenRule:
    """A ``tokenizer.tokens`` entry: where a token's row comes from. ``kind``: ``"model"`` (the
    model's row of this token), ``"model_token"`` (the model's row of ``token`` or ``token_id``),
    ``"zero"``, or None (the default rules); ``force``: also for models that have the token."""

    kind: str | None = None
    model: Path | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """What a recipe asks for: ``source`` is ``"base"``, ``"union"``, a model's path, or None (only
    a chat template for the base model's tokenizer)."""

    source: str | Path | None
    tokens: dict[str, TokenRule]
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise RecipeError(
            "tokenizer_source / tokenizer / chat_template: merging tokenizers needs transformers: "
            "pip install 'fusion-kernels[tokenizer]'"
        ) from e
    transformers.logging.set_verbosity_error()
    return transformers


def _load(transformers, path: Path):
    try:
        return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir(path)), use_fast=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ImportError, ...
        where = tokenizer_dir(path)
        if not any((where / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            why = "it has no tokenizer.json, tokenizer_config.json or tokenizer.model"
        else:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            why = short_repr(" ".join(lines[-1:] if len(lines) > 1 else lines), 200)
        raise CheckpointError(f"{where}: cannot load its tokenizer: {why}") from e


def check_chat_template_target(spec: TokenizerSpec, base: Path) -> None:
    """Before anything is written: with only a chat template asked for, the base model's tokenizer
    (which takes the template) must load."""
    if spec.source is None and spec.chat_template is not None:
        _load(_transformers(), base)


def tokenizer_dir(path: Path) -> Path:
    """Where a model reference's tokenizer lies: ``model+adapter`` -> ``model``."""
    text = str(path)
    return path if path.exists() or "+" not in text else Path(text.split("+", 1)[0])


def _config_vocab_size(path: Path) -> int | None:
    try:
        config = json.loads((tokenizer_dir(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def _ordered_vocab(tokenizer) -> list[tuple[str, int]]:
    return sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])


def _union(transformers, base_path: Path, tokenizers: dict[Path, object], sizes: dict[Path, int]):
    """The base tokenizer plus every other model's tokens it lacks, then their added tokens."""
    out = _load(transformers, base_path)
    have = set(out.get_vocab())
    added = {}
    for path, tokenizer in tokenizers.items():
        special = tokenizer.added_tokens_decoder
        for index, info in sorted(special.items()):
            if index < sizes[path] and info.content not in added:
                added[info.content] = info
        special_text = {info.content for info in special.values()}
        for token, index in _ordered_vocab(tokenizer):
            if index < sizes[path] and token not in special_text and token not in have:
                out.add_tokens(token)
                have.add(token)
    for token, info in added.items():
        if token not in have:
            out.add_tokens(info)
            have.add(token)
    return out


@dataclass
class Vocabulary:
    """The output tokenizer and, per model, the old row of each output token id (-1: absent)."""

    tokenizer: object
    order: list[Path]  # the models, in the order align() receives their tensors
    vocab: dict[str, int]
    rows: int  # the output's vocabulary dim: len(vocab) padded to pad_to_multiple_of
    permutations: dict[Path, torch.Tensor]
    original: dict[Path, dict[str, int]]
    sizes: dict[Path, int]
    spec: TokenizerSpec
    base: Path | None

    @property
    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(sorted(self.vocab.items())).encode())
        for path in sorted(self.permutations):
            h.update(self.permutations[path].numpy().tobytes())
        return h.hexdigest()

    def indexes(self, path: Path, name: str, shape: tuple) -> bool:
        """Whether tensor ``name`` of model ``path`` (of ``shape``) is indexed by its token ids."""
        return bool(VOCABULARY_TENSOR.search(name)) and len(shape) >= 1 and shape[0] == self.sizes[path]

    def align(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Each model's tensor (in :attr:`order`; None: not read) with its rows at the output's token
        ids (see the module docstring)."""
        paths = self.order
        present = [(p, t) for p, t in zip(paths, tensors, strict=True) if t is not None]
        fallback = self._fallback_rows(present)
        n = len(self.vocab)
        aligned = []
        for path, tensor in zip(paths, tensors, strict=True):
            if tensor is None:
                aligned.append(None)
                continue
            perm = self.permutations[path]
            own = (perm >= 0) & ~self.forced
            out = tensor.new_zeros((self.rows, *tensor.shape[1:]))
            out[:n][own] = tensor[perm[own]]
            for token_id, row in fallback.items():
                if not own[token_id]:
                    out[token_id] = row
            missing = [t for t in (~own).nonzero().flatten().tolist() if t not in fallback]
            if missing:
                LOG.error("no row for %d tokens of %s (first: id %d): left at zero", len(missing), path, missing[0])
            if self.rows > n:
                out[n:] = out[:n].mean(dim=0)
            aligned.append(out)
        return aligned

    @cached_property
    def forced(self) -> torch.Tensor:
        """Per output token id: whether a ``tokens:`` rule with ``force`` applies to it."""
        forced = torch.zeros(len(self.vocab), dtype=torch.bool)
        for token, rule in self.spec.tokens.items():
            if rule.force and token in self.vocab:
                forced[self.vocab[token]] = True
        return forced

    def _fallback_rows(self, present: list[tuple[Path, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """The row of every token that some model lacks or that a rule forces."""
        paths = [p for p, _ in present]
        have = torch.stack([self.permutations[p] >= 0 for p in paths])  # (models, vocab)
        needed = (~have.all(dim=0) | self.forced).nonzero().flatten().tolist()
        by_id = {token_id: token for token, token_id in self.vocab.items()}
        tensors = dict(present)
        rows = {}
        for token_id in needed:
            token = by_id[token_id]
            rule = self.spec.tokens.get(token)
            if rule is not None and rule.kind is not None:
                rows[token_id] = self._rule_row(rule, token, token_id, tensors)
                continue
            holders = [p for p, h in zip(paths, have[:, token_id].tolist(), strict=True) if h]
            if len(holders) == 1:
                rows[token_id] = tensors[holders[0]][self.permutations[holders[0]][token_id]]
            elif not holders:
                LOG.warning("token %r is in no model: its row is zero", token)
                rows[token_id] = present[0][1].new_zeros(present[0][1].shape[1:])
            elif self.base in holders:
                rows[token_id] = tensors[self.base][self.permutations[self.base][token_id]]
            else:
                rows[token_id] = torch.stack([tensors[p][self.permutations[p][token_id]] for p in holders]).mean(0)
        return rows

    def _rule_row(self, rule: TokenRule, token: str, token_id: int, tensors: dict) -> torch.Tensor:
        any_tensor = next(iter(tensors.values()))
        if rule.kind == "zero":
            return any_tensor.new_zeros(any_tensor.shape[1:])
        if rule.model not in tensors:
            raise RecipeError(f"tokenizer.tokens.{token}: model {rule.model} is not among the merged models")
        source = tensors[rule.model]
        if rule.kind == "model":
            row = int(self.permutations[rule.model][token_id])
            if row < 0:
                raise RecipeError(f"tokenizer.tokens.{token}: model {rule.model} has no token {token!r}")
            return source[row]
        row = rule.token_id if rule.token_id is not None else self.original[rule.model].get(rule.token, -1)
        if not 0 <= row < source.shape[0]:
            what = f"token_id {rule.token_id}" if rule.token_id is not None else f"token {rule.token!r}"
            raise RecipeError(f"tokenizer.tokens.{token}: model {rule.model} has no {what}")
        return source[row]


def build_vocabulary(spec: TokenizerSpec, base: Path | None, models: list[Path]) -> Vocabulary:
    """The output tokenizer (``spec.source``; plus the tokens that ``spec.tokens`` names) and each
    model's row permutation. A model without tokenizer files is taken to share the base's."""
    transformers = _transformers()
    reference = base if base is not None else models[0]
    tokenizers = {}
    for path in dict.fromkeys([reference, *models]):
        try:
            tokenizers[path] = _load(transformers, path)
        except Exception as e:  # noqa: BLE001 - any loading failure: mergekit assumes the base's tokenizer
            if path == reference:
                raise RecipeError(f"tokenizer_source: cannot load the tokenizer of {path}: {e}") from e
            LOG.warning("cannot load the tokenizer of %s (%s): taking it to be %s's", path, e, reference)
    sizes = {p: _config_vocab_size(p) or len(tokenizers.get(p, tokenizers[reference]).get_vocab()) for p in models}
    if spec.source == "base":
        out = _load(transformers, reference)
    elif spec.source == "union":
        out = _union(transformers, reference, tokenizers, {p: sizes.get(p, 1 << 62) for p in tokenizers})
    else:
        out = _load(transformers, Path(spec.source))
    for token in spec.tokens:
        if token not in out.get_vocab():
            out.add_tokens(token)
    vocab = out.get_vocab()
    rows = len(vocab)
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    permutations, original = {}, {}
    for path in models:
        own = tokenizers.get(path, tokenizers[reference]).get_vocab()
        original[path] = own
        perm = torch.full((len(vocab),), -1, dtype=torch.int64)
        for token, new_id in vocab.items():
            old = own.get(token, -1)
            if 0 <= old < sizes[path]:
                perm[new_id] = old
        permutations[path] = perm
    _set_chat_template(out, spec.chat_template, [tokenizers.get(p) for p in models])
    return Vocabulary(out, list(models), vocab, rows, permutations, original, sizes, spec, base)


def write_tokenizer(out: Path, spec: TokenizerSpec, vocabulary: Vocabulary | None, base: Path, models: list[Path]):
    """Save the merged tokenizer (or, with only a chat template asked for, the base model's with
    that template) into ``out``, replacing the tokenizer files copied from the base."""
    transformers = _transformers()
    if vocabulary is not None:
        tokenizer = vocabulary.tokenizer
    else:
        tokenizer = _load(transformers, base)
        others = []
        for path in models:
            try:
                others.append(_load(transformers, path))
            except Exception:  # noqa: BLE001 - a model without a tokenizer votes for no template
                others.append(None)
        _set_chat_template(tokenizer, spec.chat_template, others)
    for stale in TOKENIZER_FILES:
        (out / stale).unlink(missing_ok=True)
    tokenizer.save_pretrained(str(out))


def _set_chat_template(tokenizer, template: str | None, tokenizers: list) -> None:
    if template is not None:
        chosen = _chat_template(template, tokenizers)
        if chosen is not None:
            tokenizer.chat_template = chosen


def _chat_template(template: str, tokenizers: list) -> str | None:
    """``auto``: the template most of the models carry; a name of chat_templates.NAMED: that template;
    otherwise a Jinja template itself."""
    if template == "auto":
        found = []
        for tokenizer in tokenizers:
            t = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
            t = t.get("default") if isinstance(t, dict) else t
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if template in NAMED:
        return NAMED[template]
    if "{" not in template or len(template) < 20:
        raise RecipeError(
            f"chat_template: expected 'auto', one of {sorted(NAMED)} or a Jinja template, got {template[:60]!r}"
        )
    return template
