"""Learned Embedding Propagation (arXiv 2412.21140): carry adapted embeddings to an instruct model.

Instruction tuning is modelled as a linear map P (d x d) applied to the base model's
embeddings. P is solved by least squares, in float64, from the base's embeddings to the
instruct model's, and the adapted base's embeddings are sent through it. Input embeddings and
the LM head are separate matrices with separate maps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerFast as Tok

from llmtrain.errors import ConfigError, DataError
from llmtrain.vocab.build import adopt_conventions, load_tokenizer
from llmtrain.vocab.kinds import Mode
from llmtrain.vocab.resize import (
    VocabMap,
    build_vocab_map,
    is_tied,
    load_model,
    rows_for,
    set_embeddings,
    update_special_ids,
)

log = logging.getLogger(__name__)



def solve_map(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """P minimising ||source @ P - target|| (float64, rank-revealing QR).

    Raises:
        DataError: `source` has fewer rows than columns: too few tokens to fit the map (exit 65)."""
    x, y = source.to(torch.float64), target.to(torch.float64)
    if x.shape[0] < x.shape[1]:
        raise DataError(
            f"only {x.shape[0]} token rows to fit a {x.shape[1]} x {x.shape[1]} map",
            "use --mode conversion (all tokens) or --mode swap",
        )
    solution = torch.linalg.lstsq(x, y, driver="gelsy")
    if int(solution.rank) < x.shape[1]:
        log.warning(
            "embedding matrix has rank %d < %d: the map is not unique", solution.rank, x.shape[1]
        )
    return solution.solution


def fit_map(
    mode: Mode, base: torch.Tensor, instruct: torch.Tensor, vmap: VocabMap
) -> torch.Tensor | None:
    """The map from the base's old rows to the instruct model's; None for swap.

    conversion: both old matrices go through the subtoken-mean operator of the new vocabulary
    (the rows the adapted model started from), and P maps one onto the other.
    overlap: P is fitted on the tokens the two vocabularies share.
    """
    if mode == "swap":
        return None
    rows = min(base.shape[0], vmap.old_rows)
    base, instruct = base[:rows].to(torch.float64), instruct[:rows].to(torch.float64)
    if mode == "overlap":
        old_ids = torch.tensor([old for _, old in vmap.shared], dtype=torch.long)
        return solve_map(base[old_ids], instruct[old_ids])
    op = vmap.operator()
    fitted = torch.tensor([bool(s) for s in vmap.sources])  # rows without sources carry no signal
    return solve_map(torch.sparse.mm(op, base)[fitted], torch.sparse.mm(op, instruct)[fitted])


def propagate(
    mode: Mode,
    base: torch.Tensor,
    instruct: torch.Tensor,
    adapted: torch.Tensor,
    vmap: VocabMap,
) -> torch.Tensor:
    """The instruct model's new matrix: adapted rows through the fitted map (float64)."""
    p = fit_map(mode, base, instruct, vmap)
    adapted64 = adapted.to(torch.float64)
    return adapted64 if p is None else adapted64 @ p


def _matrices(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = None if is_tied(model) else model.get_output_embeddings().weight.detach()
    return model.get_input_embeddings().weight.detach(), head


def _check_same_vocab(base: Tok, instruct: Tok, base_dir: Path, instruct_dir: Path) -> None:
    inst_vocab = instruct.get_vocab()
    moved = [t for t, i in base.get_vocab().items() if inst_vocab.get(t) != i]
    if moved:
        raise ConfigError(
            f"{len(moved)} tokens of the base tokenizer ({base_dir}) have other ids in the "
            f"instruct tokenizer ({instruct_dir}), e.g. {moved[:3]}",
            "pass the instruct model made from this base model",
        )


def _with_instruct_rows(
    new: torch.Tensor, instruct: torch.Tensor, rows: int, own: dict[int, int]
) -> torch.Tensor:
    """`new` grown to `rows`, with the instruct model's rows for its own tokens (out id -> id)."""
    full = torch.cat([new, new.new_zeros(rows - new.shape[0], new.shape[1])])
    for out_id, inst_id in own.items():
        full[out_id] = instruct[inst_id].to(full.dtype)
    return full


def propagate_to_instruct(
    base_dir: Path, adapted_dir: Path, instruct_dir: Path, mode: Mode, out: Path
) -> VocabMap:
    """`lep`: the instruct model with the adapted vocabulary, its transformer layers untouched.

    The output tokenizer is the adapted one plus the instruct tokenizer's own added tokens,
    special-token map and chat template; the rows of the instruct tokenizer's added and
    special tokens (chat markers, eos, ...) are the instruct model's own, whatever the mode.
    Models are loaded one at a time, so memory holds at most two.

    Raises:
        ConfigError: the three models' hidden sizes differ, the adapted model has fewer embedding
            rows than its tokenizer needs, or the instruct model's LM head is untied where the
            others are tied (exit 64).
        DataError: too few shared token rows to fit the map (solve_map; exit 65).
    """
    base_tok, adapted_tok, inst_tok = (
        load_tokenizer(d) for d in (base_dir, adapted_dir, instruct_dir)
    )
    _check_same_vocab(base_tok, inst_tok, base_dir, instruct_dir)
    base_in, base_head = _matrices(load_model(base_dir))
    adapted_in, adapted_head = _matrices(load_model(adapted_dir))
    instruct = load_model(instruct_dir)
    inst_in, inst_head = _matrices(instruct)
    if not base_in.shape[1] == adapted_in.shape[1] == inst_in.shape[1]:
        raise ConfigError(
            "the base, adapted and instruct models have different hidden sizes "
            f"({base_in.shape[1]}, {adapted_in.shape[1]}, {inst_in.shape[1]})",
            "pass the adapted model of this base and the instruct model of the same family",
        )
    vmap = build_vocab_map(base_tok, adapted_tok, adapted_in.shape[0], base_in.shape[0])
    if vmap.new_rows != adapted_in.shape[0]:
        raise ConfigError(
            f"{adapted_dir}: the tokenizer needs {vmap.new_rows} rows, the model has "
            f"{adapted_in.shape[0]}",
            "run `llmtrain vocab init` on the base model with this tokenizer",
        )
    new_in = propagate(mode, base_in, inst_in, adapted_in, vmap)
    new_head = None
    if inst_head is not None:
        if base_head is None or adapted_head is None:
            raise ConfigError(
                "the instruct model has an untied LM head but the base or adapted model is tied",
                "pass models of one family (same tie_word_embeddings)",
            )
        new_head = propagate(mode, base_head, inst_head, adapted_head, vmap)

    out_tok = adapted_tok
    adopt_conventions(out_tok, inst_tok)
    rows = rows_for(out_tok, None, at_least=[adapted_in.shape[0]])
    inst_ids = inst_tok.get_vocab()
    own = {
        i: inst_ids[t.content]
        for i, t in out_tok.added_tokens_decoder.items()
        if t.content in inst_ids
    }
    new_in = _with_instruct_rows(new_in, inst_in, rows, own)
    if new_head is not None and inst_head is not None:
        new_head = _with_instruct_rows(new_head, inst_head, rows, own)
    set_embeddings(instruct, rows, new_in, new_head)
    update_special_ids(instruct, inst_tok, out_tok)
    out.mkdir(parents=True, exist_ok=True)
    instruct.save_pretrained(str(out))
    out_tok.save_pretrained(str(out))
    log.info("lep %s: %s; %d rows from the instruct model", mode, vmap.summary(), len(own))
    return vmap
