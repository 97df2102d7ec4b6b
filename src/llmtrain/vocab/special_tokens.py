"""BOS, EOS and padding, decided once from the tokenizer and used by every code path.

Tokenizers say in several places whether they add BOS or EOS (`add_bos_token`,
`add_eos_token`, the fast tokenizer's post-processor), and models name an EOS of their own in
`config.json` and `generation_config.json`. Reading a different one in each code path trains
a doubled EOS, or none, or one the model never stops at. Here the tokenizer decides:

- BOS: one, first, exactly where the tokenizer's own `add_special_tokens=True` puts one.
- EOS: the tokenizer's `eos_token` (or `model.eos_token`), once at the end of every trained
  sample. Text is tokenized with `add_special_tokens=False`, so no flag adds a second one.
- padding: the tokenizer's pad token, else UNK, else EOS; labels carry the mask, so padding is
  never trained whichever it is.

The EOS that was trained is written into every saved model's and adapter's generation config
(`stamp_generation_config`), so `generate` and other tools stop where training taught it to.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.config import ModelSection
from llmtrain.errors import ConfigError


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids (int) of the policy above; `bos_id` is None where the model takes no BOS."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    eos_token: str


def _set_token(tokenizer: Any, role: str, token: str, key: str) -> None:
    ids = tokenizer.convert_tokens_to_ids([token])
    if token not in tokenizer.get_vocab() or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ConfigError(
            f"{key}={token!r} is not a token of the tokenizer",
            f"set {key} to one of its tokens (its special tokens: "
            f"{', '.join(tokenizer.all_special_tokens) or 'none'})",
        )
    setattr(tokenizer, role, token)


def apply_overrides(tokenizer: Any, cfg: ModelSection) -> None:
    """Set `model.eos_token` / `model.pad_token` on the tokenizer, then decide padding.

    Raises:
        ConfigError: a configured token is not in the vocabulary, or the tokenizer has no EOS
            and none is configured (exit 64).
    """
    if cfg.eos_token is not None:
        _set_token(tokenizer, "eos_token", cfg.eos_token, "model.eos_token")
    if cfg.pad_token is not None:
        _set_token(tokenizer, "pad_token", cfg.pad_token, "model.pad_token")
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"the tokenizer of {cfg.tokenizer or cfg.path!r} has no EOS token, so no trained "
            "sample could end and generation would never stop",
            "set model.eos_token to the token that ends a sample (e.g. '</s>' or "
            "'<|endoftext|>'), or set eos_token in the tokenizer's tokenizer_config.json",
        )
    if tokenizer.pad_token_id is None:
        # Labels carry the masking, so reusing UNK or EOS as padding never trains on padding.
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token else tokenizer.eos_token


def decide(tokenizer: Any) -> SpecialTokens:
    """The policy for this tokenizer (after `apply_overrides`)."""
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    takes_bos = (
        bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
    )
    return SpecialTokens(
        bos_id=bos if takes_bos else None,
        eos_id=int(tokenizer.eos_token_id),
        pad_id=int(tokenizer.pad_token_id),
        eos_token=str(tokenizer.eos_token),
    )


def eos_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def config_warnings(special: SpecialTokens, config: Any, generation_config: Any) -> list[str]:
    """Where the model's config or generation config would stop at another token than the
    trained EOS (fixed in every saved output by `stamp_generation_config`)."""
    warnings = []
    for name, cfg in (("config.json", config), ("generation_config.json", generation_config)):
        if cfg is None:
            continue
        ids = eos_ids(getattr(cfg, "eos_token_id", None))
        if ids and special.eos_id not in ids:
            warnings.append(
                f"the model's {name} ends generation at token id(s) {ids}, but training ends "
                f"samples with {special.eos_token!r} (id {special.eos_id}); saved outputs get "
                "the trained EOS in their generation_config.json"
            )
    return warnings


def stamp_generation_config(generation_config: Any, special: SpecialTokens) -> Any:
    """Make `generation_config` stop at the trained EOS (kept first; the model's own EOS ids
    stay as further stop tokens) and pad with the trained pad id. Returns it, changed in place."""
    ids = eos_ids(getattr(generation_config, "eos_token_id", None))
    merged = [special.eos_id, *(i for i in ids if i != special.eos_id)]
    generation_config.eos_token_id = merged[0] if len(merged) == 1 else merged
    generation_config.pad_token_id = special.pad_id
    return generation_config


def write_generation_config(
    directory: Path, base: Any, tokenizer: Any, *, also_stop: Sequence[int] = ()
) -> None:
    """Write `directory/generation_config.json`: `base`'s generation config (or transformers'
    defaults where None) stopping at `tokenizer`'s trained EOS, then at `also_stop` (a chat
    template's end-of-turn token). An adapter directory gets one too, so whoever loads the
    adapter stops where training taught it to."""
    from transformers import GenerationConfig

    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    stamp_generation_config(config, decide(tokenizer))
    ids = eos_ids(config.eos_token_id)
    ids += [i for i in also_stop if i not in ids]
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
    config.save_pretrained(str(directory))


def stop_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """Token ids that end generation: the tokenizer's EOS first, then the model's own."""
    ids = eos_ids(getattr(generation_config, "eos_token_id", None))
    eos = tokenizer.eos_token_id
    return [eos, *(i for i in ids if i != eos)] if eos is not None else ids
