"""Resize a model to a new vocabulary, each new row the mean of its old subtoken rows.

The map from new token ids to old ones is also the subtoken-mean operator that LEP
(`embedding_map`) uses, so it is built once here and shared.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers import PreTrainedTokenizerFast as Tok

from llmtrain.errors import ConfigError
from llmtrain.vocab.build import load_tokenizer, tokenizer_kind

log = logging.getLogger(__name__)

ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@dataclass(frozen=True)
class VocabMap:
    """For each new row, the old rows whose mean it starts from.

    A row with one source is a copy; an empty tuple means no old token corresponds (a new
    special token, or padding rows past the tokenizer), and the row gets the mean of all old rows.
    `shared` lists (new id, old id) of tokens spelled the same in both vocabularies.
    """

    sources: tuple[tuple[int, ...], ...]
    shared: tuple[tuple[int, int], ...]
    old_rows: int

    @property
    def new_rows(self) -> int:
        return len(self.sources)

    def summary(self) -> str:
        averaged = sum(len(s) > 1 for s in self.sources)
        unmatched = sum(not s for s in self.sources)
        copied = self.new_rows - averaged - unmatched
        return (
            f"{self.new_rows} rows: {copied} copied, {averaged} subtoken means, "
            f"{unmatched} without an old token (mean of all rows)"
        )

    def operator(self) -> torch.Tensor:
        """The sparse (new rows x old rows) float64 matrix of subtoken means."""
        rows, cols, vals = [], [], []
        for new_id, src in enumerate(self.sources):
            rows += [new_id] * len(src)
            cols += list(src)
            vals += [1.0 / len(src)] * len(src) if src else []
        return torch.sparse_coo_tensor(
            torch.tensor([rows, cols], dtype=torch.long),
            torch.tensor(vals, dtype=torch.float64),
            (self.new_rows, self.old_rows),
            check_invariants=True,
        ).coalesce()

    def apply(self, old: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """New matrix (new rows x d) from the old one, computed in `dtype`."""
        old = old.to(dtype)
        new = torch.sparse.mm(self.operator().to(dtype), old)
        unmatched = torch.tensor([not s for s in self.sources])
        new[unmatched] = old.mean(dim=0)
        return new


def _role_ids(tok: Tok) -> dict[str, int]:
    return {r: i for r in ROLES if (i := getattr(tok, f"{r}_id")) is not None}


def build_vocab_map(
    old: Tok, new: Tok, rows: int | None = None, old_rows: int | None = None
) -> VocabMap:
    """Map every id of `new` (and padding rows up to `rows`) to ids of `old`.

    Tokens spelled the same are copied (special and byte tokens included); special tokens
    otherwise match by role (bos to bos, ...); other tokens are split by the old tokenizer's
    model, on the token's own symbols, so "▁привет" or a byte-level "Ġпр" is split exactly as
    the old tokenizer splits the same bytes.

    Raises:
        ConfigError: the new tokenizer's style (SentencePiece or byte-level BPE) is not the model's
            (exit 64).
    """
    kind, old_kind = tokenizer_kind(new), tokenizer_kind(old)
    if kind != old_kind:
        raise ConfigError(
            f"the new tokenizer is {kind} style but the model's is {old_kind}",
            "train the new tokenizer with `llmtrain vocab train --like MODEL_DIR`",
        )
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    old_rows = old_rows or max(old_vocab.values()) + 1
    rows = max(rows or 0, max(new_vocab.values()) + 1)
    old_by_role = _role_ids(old)
    new_role = {i: r for r, i in _role_ids(new).items()}
    specials = {i for i, t in new.added_tokens_decoder.items() if t.special} | set(new_role)
    added = {i: t.content for i, t in new.added_tokens_decoder.items() if not t.special}
    splitter = old.backend_tokenizer.model
    sources: list[tuple[int, ...]] = [()] * rows
    shared: list[tuple[int, int]] = []
    for token, new_id in new_vocab.items():
        if token in old_vocab and old_vocab[token] < old_rows:
            sources[new_id] = (old_vocab[token],)
            shared.append((new_id, old_vocab[token]))
        elif new_id in specials:
            role = new_role.get(new_id)
            sources[new_id] = (old_by_role[role],) if role in old_by_role else ()
        elif new_id in added:  # added tokens hold raw text, not model symbols
            sources[new_id] = tuple(old.encode(added[new_id], add_special_tokens=False))
        else:
            sources[new_id] = tuple(t.id for t in splitter.tokenize(token))
    return VocabMap(tuple(sources), tuple(sorted(shared)), old_rows)


def load_model(path: str | Path) -> PreTrainedModel:
    """A causal LM from a local directory, in its saved dtype.

    Raises:
        ConfigError: no causal LM can be loaded from `path` (exit 64)."""
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            str(path), torch_dtype="auto", local_files_only=True, low_cpu_mem_usage=True
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load a causal LM from {path}: {err}",
            "pass a directory saved with save_pretrained (config.json + weights)",
        ) from None
    return model


def is_tied(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


def set_embeddings(
    model: PreTrainedModel, rows: int, inputs: torch.Tensor, head: torch.Tensor | None
) -> None:
    """Resize to `rows` and set the matrices; the head only where the model is untied.

    `resize_token_embeddings` ties again only where the config says tied, so an untied model
    stays untied.
    """
    model.resize_token_embeddings(rows)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(inputs.to(emb.dtype))
        if not is_tied(model):
            if head is None:
                raise ValueError("an untied model needs its own head matrix")
            out = model.get_output_embeddings().weight
            out.copy_(head.to(out.dtype))


def initialise(model: PreTrainedModel, vmap: VocabMap) -> None:
    """Resize `model` to the new vocabulary, each matrix from its own old rows."""
    emb = model.get_input_embeddings().weight.detach()
    head_layer = model.get_output_embeddings()
    tied = is_tied(model)
    bias = None if head_layer is None else getattr(head_layer, "bias", None)
    new_bias = None if bias is None else vmap.apply(bias.detach()[:, None])[:, 0]
    new_head = None if tied else vmap.apply(head_layer.weight.detach())
    set_embeddings(model, vmap.new_rows, vmap.apply(emb), new_head)
    if new_bias is not None:
        with torch.no_grad():
            model.get_output_embeddings().bias.copy_(new_bias)
    log.info("initialised %s (%s)", vmap.summary(), "tied" if tied else "untied")


def _remap_id(token_id: int, key: str, old: Tok, new: Tok) -> int | None:
    content = old.convert_ids_to_tokens(token_id)
    new_id = new.get_vocab().get(content) if content is not None else None
    if new_id is None:  # same role in the new tokenizer, e.g. eos -> its eos
        new_id = getattr(new, key.replace("decoder_start_", "bos_"), None)
    return new_id


def remap_special_ids(target: Any, old: Tok, new: Tok) -> None:
    """Rewrite bos/eos/pad ids of a model or generation config from `old` ids to `new` ones."""
    for key in SPECIAL_ID_KEYS:
        value = getattr(target, key, None)
        if value is None:
            continue
        if isinstance(value, list):
            mapped = [_remap_id(v, key, old, new) for v in value]
            setattr(target, key, [v for v in dict.fromkeys(mapped) if v is not None] or None)
        else:
            setattr(target, key, _remap_id(value, key, old, new))


def update_special_ids(model: PreTrainedModel, old: Tok, new: Tok) -> None:
    """config.json and generation_config.json follow the new tokenizer's ids."""
    remap_special_ids(model.config, old, new)
    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    else:
        remap_special_ids(model.generation_config, old, new)


def rows_for(tok: Tok, pad_to_multiple_of: int | None, at_least: Iterable[int] = ()) -> int:
    """Embedding rows for `tok`, rounded up for efficient matmuls."""
    rows = max([max(tok.get_vocab().values()) + 1, *at_least])
    if pad_to_multiple_of:
        rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
    return rows


def init_model_dir(
    model_dir: Path, tokenizer_dir: Path, out: Path, pad_to_multiple_of: int | None = None
) -> VocabMap:
    """`vocab init`: the model in `model_dir` resized to `tokenizer_dir`'s vocabulary, saved.

    Raises:
        ConfigError: the model's tokenizer has ids beyond its embedding rows, or a tokenizer or
            model cannot be loaded (exit 64)."""
    old, new = load_tokenizer(model_dir), load_tokenizer(tokenizer_dir)
    model = load_model(model_dir)
    old_rows = model.get_input_embeddings().num_embeddings
    if max(old.get_vocab().values()) >= old_rows:
        raise ConfigError(
            f"the tokenizer in {model_dir} has ids up to {max(old.get_vocab().values())} but "
            f"the model has {old_rows} embedding rows",
            "save the model with the tokenizer it was trained with",
        )
    vmap = build_vocab_map(old, new, rows_for(new, pad_to_multiple_of), old_rows)
    initialise(model, vmap)
    update_special_ids(model, old, new)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    new.save_pretrained(str(out))
    return vmap
