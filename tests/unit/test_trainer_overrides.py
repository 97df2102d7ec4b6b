"""Every Trainer method that llmtrain's trainers override takes each call the installed
transformers makes: each of the base method's parameters by name, or through *args or **kwargs
(the Trainer passes each one way), and by name those the base takes only by name.

transformers 5.x added arguments to methods that 4.37.2 called bare: create_optimizer(model)
after an FSDP1 wrap, _get_train_sampler(dataset), training_step(..., num_items_in_batch),
log(logs, start_time). An override without them fails only on the path that passes them."""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer

from llmtrain.train.preference import PreferenceTrainer
from llmtrain.train.trainer import LlmtrainTrainer


def overrides(cls: type) -> list[str]:
    return sorted(
        name
        for name, value in vars(cls).items()
        if callable(value) and name != "__init__" and hasattr(Trainer, name)
    )


def takes(override: inspect.Signature, base: inspect.Signature) -> list[str]:
    """The base method's parameters that a call could pass and the override cannot take."""
    params = list(override.parameters.values())
    by_position = {p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
    by_name = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    missing = []
    for p in base.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            ok = var_pos
        elif p.kind is p.VAR_KEYWORD:
            ok = var_kw
        elif p.kind is p.KEYWORD_ONLY:
            ok = p.name in by_name or var_kw
        else:  # the Trainer passes each one way: by position or by name
            ok = p.name in by_position or var_pos or var_kw
        if not ok:
            missing.append(str(p))
    return missing


@pytest.mark.parametrize("cls", [LlmtrainTrainer, PreferenceTrainer])
def test_overrides_take_every_argument_the_base_method_takes(cls: type) -> None:
    found = overrides(cls)
    assert "create_optimizer" in found or cls is PreferenceTrainer
    for name in found:
        base = inspect.signature(getattr(Trainer, name))
        assert not takes(inspect.signature(getattr(cls, name)), base), (name, str(base))
