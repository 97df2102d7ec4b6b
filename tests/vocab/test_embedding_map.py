"""LEP math: a planted linear map is recovered; swap copies; the CLI keeps layers untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from llmtrain.cli import main
from llmtrain.errors import ConfigError, DataError
from llmtrain.vocab.build import load_tokenizer, train_sentencepiece
from llmtrain.vocab.propagate import fit_map, propagate, propagate_to_instruct
from llmtrain.vocab.resize import build_vocab_map, init_model_dir, load_model

from .tiny import RU, save

BaseDir = Callable[[PreTrainedTokenizerFast, bool], Path]


@pytest.fixture(scope="module")
def sp_ru(sp_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Russian tokenizer replacing the English base's (shared pieces: bytes, specials, ...)."""
    out = tmp_path_factory.mktemp("sp-ru")
    train_sentencepiece([RU], 900, out, like=sp_tokenizer)
    return out


def _planted(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.linspace(0.5, 2.0, d, dtype=torch.float64)  # well conditioned, not orthogonal


@pytest.mark.parametrize("mode", ["conversion", "overlap"])
def test_fit_recovers_a_planted_map(
    mode: str, sp_tokenizer: PreTrainedTokenizerFast, sp_ru: Path
) -> None:
    vmap = build_vocab_map(sp_tokenizer, load_tokenizer(sp_ru))
    d = 32
    base = torch.randn(
        vmap.old_rows, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    planted = _planted(d, 2)
    fitted = fit_map(mode, base, base @ planted, vmap)  # type: ignore[arg-type]
    assert fitted is not None
    torch.testing.assert_close(fitted, planted, rtol=1e-9, atol=1e-9)
    adapted = vmap.apply(base, torch.float64)
    instruct_new = propagate(mode, base, base @ planted, adapted, vmap)  # type: ignore[arg-type]
    torch.testing.assert_close(instruct_new, adapted @ planted, rtol=1e-9, atol=1e-9)
    # Tokens both vocabularies share get exactly the instruct model's rows back.
    new_ids, old_ids = zip(*vmap.shared, strict=True)
    torch.testing.assert_close(instruct_new[list(new_ids)], (base @ planted)[list(old_ids)])


def test_swap_copies(sp_tokenizer: PreTrainedTokenizerFast, sp_ru: Path) -> None:
    vmap = build_vocab_map(sp_tokenizer, load_tokenizer(sp_ru))
    base, instruct = torch.randn(vmap.old_rows, 8), torch.randn(vmap.old_rows, 8)
    adapted = torch.randn(vmap.new_rows, 8)
    assert fit_map("swap", base, instruct, vmap) is None
    assert torch.equal(propagate("swap", base, instruct, adapted, vmap), adapted.double())


def test_overlap_needs_enough_shared_tokens(
    sp_tokenizer: PreTrainedTokenizerFast, sp_ru: Path
) -> None:
    vmap = build_vocab_map(sp_tokenizer, load_tokenizer(sp_ru))
    d = len(vmap.shared) + 1
    with pytest.raises(DataError, match="token rows to fit"):
        fit_map("overlap", torch.randn(vmap.old_rows, d), torch.randn(vmap.old_rows, d), vmap)


@pytest.mark.parametrize("mode", ["conversion", "overlap", "swap"])
def test_lep_on_a_planted_instruct_model(
    mode: str,
    sp_tokenizer: PreTrainedTokenizerFast,
    sp_ru: Path,
    base_dir: BaseDir,
    tmp_path: Path,
) -> None:
    """Instruct = base with embeddings x M and head x M2 and perturbed layers."""
    base = base_dir(sp_tokenizer, False)
    model = load_model(base)
    m_in, m_head = _planted(32, 3).float(), _planted(32, 4).float()
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight @ m_in)
        model.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight @ m_head)
        for name, p in model.named_parameters():
            if "layers." in name:
                p.add_(0.01 * torch.randn_like(p))
    instruct = save(model, load_tokenizer(base), tmp_path / "instruct")
    init_model_dir(base, sp_ru, tmp_path / "adapted")  # untrained: adapted = subtoken means
    out = tmp_path / "out"
    assert (
        main(
            [
                "lep",
                "--base",
                str(base),
                "--adapted",
                str(tmp_path / "adapted"),
                "--instruct",
                str(instruct),
                "--mode",
                mode,
                "--out",
                str(out),
            ]
        )
        == 0
    )

    result, adapted, inst = load_model(out), load_model(tmp_path / "adapted"), load_model(instruct)
    new_tok, old_tok = load_tokenizer(out), load_tokenizer(base)
    old_vocab = old_tok.get_vocab()
    pairs = [(i, old_vocab[t]) for t, i in new_tok.get_vocab().items() if t in old_vocab]
    assert len(pairs) > 100  # bytes, specials, punctuation, digits
    for get in ("get_input_embeddings", "get_output_embeddings"):
        got = getattr(result, get)().weight.detach()
        if mode == "swap":
            ordinary = [i for i in range(len(new_tok)) if i not in new_tok.all_special_ids]
            assert torch.equal(got[ordinary], getattr(adapted, get)().weight.detach()[ordinary])
        else:  # old tokens get the instruct model's rows back
            want = getattr(inst, get)().weight.detach()
            for new_id, old_id in pairs:
                torch.testing.assert_close(got[new_id], want[old_id], rtol=1e-4, atol=1e-5)
    inst_state = inst.state_dict()
    for name, tensor in result.state_dict().items():
        if "layers." in name or name == "model.norm.weight":
            assert torch.equal(tensor, inst_state[name]), name


def test_lep_refuses_an_instruct_model_of_another_base(
    sp_tokenizer: PreTrainedTokenizerFast,
    bl_tokenizer: PreTrainedTokenizerFast,
    sp_ru: Path,
    base_dir: BaseDir,
    tmp_path: Path,
) -> None:
    base = base_dir(sp_tokenizer, False)
    init_model_dir(base, sp_ru, tmp_path / "adapted")
    other = base_dir(bl_tokenizer, False)
    with pytest.raises(ConfigError, match="have other ids in the instruct tokenizer"):
        propagate_to_instruct(base, tmp_path / "adapted", other, "conversion", tmp_path / "out")
