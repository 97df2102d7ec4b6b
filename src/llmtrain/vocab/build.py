"""Train and extend tokenizers in the two styles of the bases we adapt.

SentencePiece style (LLaMA-2, Mistral): a BPE or Unigram model over characters with byte
fallback, "▁" marking word starts. Byte-level BPE style (LLaMA-3): a BPE over the 256 byte
symbols after a regex split. Every tokenizer here is a Hugging Face fast tokenizer saved as a
directory, so `AutoTokenizer.from_pretrained(DIR)` loads it like a model's own.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast

from llmtrain.errors import ConfigError, DataError
from llmtrain.vocab.kinds import BYTE_LEVEL, SENTENCEPIECE, Kind

log = logging.getLogger(__name__)


# LLaMA-3's pre-tokenizer split; used when a byte-level tokenizer is trained without a base.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA2_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
_EMPTY_BPE: dict[str, Any] = {
    "type": "BPE",
    "dropout": None,
    "unk_token": None,
    "continuing_subword_prefix": None,
    "end_of_word_suffix": None,
    "fuse_unk": False,
    "byte_fallback": False,
    "vocab": {},
    "merges": [],
}


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a model or tokenizer directory (offline).

    Raises:
        ConfigError: no fast tokenizer can be loaded from `path` (exit 64)."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load a tokenizer from {path}: {err}",
            "pass a directory holding tokenizer.json or tokenizer.model (a saved model or "
            "the output of `llmtrain vocab train`)",
        ) from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ConfigError(
            f"{path} has no fast tokenizer", "save it with a tokenizer.json (fast tokenizer)"
        )
    return tok


def backend_state(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(tok.backend_tokenizer.to_str())
    return state


def tokenizer_kind(tok: PreTrainedTokenizerFast) -> Kind:
    """SentencePiece style ("▁" word marks) or byte-level BPE, from the pipeline's components.

    Raises:
        ConfigError: the tokenizer is neither SentencePiece style nor byte-level BPE (exit 64)."""
    state = backend_state(tok)
    pipeline = json.dumps(
        [state.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")], ensure_ascii=False
    )
    if '"ByteLevel"' in pipeline:
        return BYTE_LEVEL
    if "▁" in pipeline and state["model"]["type"] in ("BPE", "Unigram"):
        return SENTENCEPIECE
    raise ConfigError(
        f"tokenizer {tok.name_or_path} is neither SentencePiece style nor byte-level BPE "
        f"(model {state['model']['type']})",
        "vocabulary adaptation supports LLaMA-2/Mistral (SentencePiece) and LLaMA-3 "
        "(byte-level BPE) style tokenizers",
    )


def _check_files(files: Sequence[Path]) -> None:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"text files not found: {', '.join(missing)}", "pass existing files")
    if not any(f.stat().st_size for f in files):
        raise DataError("the training text files are empty", "pass files with text, one line each")


def adopt_conventions(tok: PreTrainedTokenizerFast, like: PreTrainedTokenizerFast | None) -> None:
    """Give `tok` the added tokens `like` has and it lacks, `like`'s special-token map, chat
    template and length limit."""
    if like is None:
        return
    extra = [t for _, t in sorted(like.added_tokens_decoder.items()) if t.content not in tok.vocab]
    tok.add_tokens(extra)  # AddedToken objects keep their `special` flag
    tok.add_special_tokens(like.special_tokens_map_extended)
    tok.chat_template = like.chat_template
    tok.model_max_length = like.model_max_length


def _save(tok: PreTrainedTokenizerFast, out: Path) -> PreTrainedTokenizerFast:
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return load_tokenizer(out)


def train_sentencepiece(
    files: Sequence[Path],
    vocab_size: int,
    out: Path,
    *,
    model_type: Literal["bpe", "unigram"] = "bpe",
    like: PreTrainedTokenizerFast | None = None,
    character_coverage: float = 0.9999,
) -> PreTrainedTokenizerFast:
    """A LLaMA-2 style tokenizer: byte fallback, split digits, bos/eos/unk at ids 1/2/0.

    `vocab_size` counts every piece of the SentencePiece model, bytes and bos/eos/unk included;
    the base's other added tokens (`like`) come on top.

    Raises:
        DataError: SentencePiece training fails on the corpus (e.g. too little text for vocab_size;
            exit 65).
    """
    _check_files(files)
    names = {k: getattr(like, k) or v for k, v in LLAMA2_SPECIALS.items()} if like else {}
    names = names or dict(LLAMA2_SPECIALS)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spm.SentencePieceTrainer.train(
                input=[str(f) for f in files],
                model_prefix=f"{tmp}/sp",
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                split_digits=True,
                character_coverage=character_coverage,
                # LLaMA's settings: keep text as is, mark the first word like every other.
                normalization_rule_name="identity",
                add_dummy_prefix=True,
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                unk_piece=names["unk_token"],
                bos_piece=names["bos_token"],
                eos_piece=names["eos_token"],
                input_sentence_size=10_000_000,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise DataError(
                f"SentencePiece training failed: {err}",
                "lower --vocab-size or give more text",
            ) from None
        # legacy=True: LLaMA-2's own tokenizer behaviour (the flag only silences a warning).
        tok = LlamaTokenizerFast(vocab_file=f"{tmp}/sp.model", from_slow=True, legacy=True, **names)
        adopt_conventions(tok, like)
        return _save(tok, out)


def _llama3_skeleton() -> Tokenizer:
    tok = Tokenizer.from_str(json.dumps({"version": "1.0", "model": _EMPTY_BPE}))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _fix_special_ids(node: Any, tok: Tokenizer) -> Any:
    """Point a post-processor's special tokens at their ids in `tok` (they moved)."""
    if isinstance(node, list):
        return [_fix_special_ids(n, tok) for n in node]
    if not isinstance(node, dict):
        return node
    fixed = {k: _fix_special_ids(v, tok) for k, v in node.items()}
    if "ids" in fixed and "tokens" in fixed:
        fixed["ids"] = [tok.token_to_id(t) for t in fixed["tokens"]]
    for key in ("sep", "cls"):  # Bert/Roberta processors hold [token, id]
        if isinstance(fixed.get(key), list) and len(fixed[key]) == 2:
            fixed[key] = [fixed[key][0], tok.token_to_id(fixed[key][0])]
    return fixed


def train_byte_level(
    files: Sequence[Path],
    vocab_size: int,
    out: Path,
    *,
    like: PreTrainedTokenizerFast | None = None,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the base's pipeline and special tokens (LLaMA-3's without a base).

    `vocab_size` counts the learned vocabulary (the 256 byte symbols included); the special
    tokens come after it, as in LLaMA-3.
    """
    _check_files(files)
    if like is None:
        skeleton, post = _llama3_skeleton(), _bos_template(LLAMA3_SPECIALS["bos_token"])
        specials = [AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS.values()]
        special_map: dict[str, Any] = dict(LLAMA3_SPECIALS)
    else:
        state = backend_state(like)
        post = state["post_processor"]
        state.update(model=_EMPTY_BPE, added_tokens=[], post_processor=None)
        skeleton = Tokenizer.from_str(json.dumps(state))
        specials = [t for _, t in sorted(like.added_tokens_decoder.items())]
        special_map = like.special_tokens_map
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    skeleton.train([str(f) for f in files], trainer)
    skeleton.add_special_tokens([t for t in specials if t.special])
    skeleton.add_tokens([t for t in specials if not t.special])
    state = json.loads(skeleton.to_str())
    state["post_processor"] = _fix_special_ids(post, skeleton)
    backend = Tokenizer.from_str(json.dumps(state))
    # Causal LMs take no token_type_ids (LLaMA-3's tokenizer_config says the same).
    names = like.model_input_names if like else ["input_ids", "attention_mask"]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=names, **special_map)
    adopt_conventions(tok, like)
    return _save(tok, out)


def _bos_template(bos: str) -> dict[str, Any]:
    """LLaMA-3's post-processor: prepend bos (ids are filled in by _fix_special_ids)."""
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            special,
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [], "tokens": [bos]}},
    }


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    # tokenizers < 0.20 writes merges as "a b", later versions as ["a", "b"].
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left, right


def extend_tokenizer(
    base: PreTrainedTokenizerFast, new: PreTrainedTokenizerFast, out: Path
) -> tuple[PreTrainedTokenizerFast, list[str]]:
    """Append `new`'s tokens missing from `base`; every old token keeps its id.

    New BPE merges rank after all of the base's, so the base's own merges still apply first.
    Returns the saved tokenizer and the appended tokens. No slow tokenizer.model is written:
    the base's would no longer match the vocabulary.

    Raises:
        ConfigError: the two tokenizers differ in style or model type, or a Unigram base has added
            tokens after its vocabulary (exit 64).
    """
    kind, new_kind = tokenizer_kind(base), tokenizer_kind(new)
    if kind != new_kind:
        raise ConfigError(
            f"the base tokenizer is {kind} style but the new one is {new_kind}",
            f"train the new tokenizer with `llmtrain vocab train --like {base.name_or_path}`",
        )
    state, new_model = backend_state(base), backend_state(new)["model"]
    model = state["model"]
    if model["type"] != new_model["type"]:
        raise ConfigError(
            f"the base tokenizer is {model['type']} but the new one is {new_model['type']}",
            f"train the new tokenizer with --model {model['type'].lower()}",
        )
    taken = base.get_vocab()
    skip = set(new.all_special_tokens) | {t.content for t in new.added_tokens_decoder.values()}
    if model["type"] == "BPE":
        candidates = [p for p, _ in sorted(new_model["vocab"].items(), key=lambda kv: kv[1])]
    else:
        candidates = [p for p, _ in new_model["vocab"]]
    appended = [p for p in candidates if p not in taken and p not in skip]
    if model["type"] == "BPE":
        # tokenizers gives added tokens missing from the model's vocabulary the ids after it,
        # whatever tokenizer.json says; LLaMA-3 keeps them last, so pin them inside the
        # vocabulary (no merge produces them) and append after them.
        for token_id, token in base.added_tokens_decoder.items():
            model["vocab"].setdefault(token.content, token_id)
        first = max(taken.values()) + 1
        model["vocab"].update({p: first + i for i, p in enumerate(appended)})
        known = {_merge_pair(m) for m in model["merges"]}
        as_str = bool(model["merges"]) and isinstance(model["merges"][0], str)
        for merge in new_model["merges"]:
            pair = _merge_pair(merge)
            if pair not in known:
                known.add(pair)
                model["merges"].append(" ".join(pair) if as_str else list(pair))
    else:
        if max(taken.values()) >= len(model["vocab"]):
            raise ConfigError(
                "the base Unigram tokenizer has added tokens after its vocabulary; appending "
                "pieces would change their ids",
                "extend a tokenizer without added tokens, then add them again",
            )
        scores = dict((p, s) for p, s in new_model["vocab"])
        model["vocab"].extend([p, scores[p]] for p in appended)
    out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(str(out))
    (out / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer.model").unlink(missing_ok=True)
    extended = load_tokenizer(out)
    log.info("extended %s by %d tokens to %d", base.name_or_path, len(appended), len(extended))
    return extended, appended
