import pytest
import torch
from torch import nn

from llmtrain.config import LoraSection, MethodSection
from llmtrain.errors import ConfigError
from llmtrain.model.methods import LORA_TARGETS, count_parameters, select_parameters, wrap
from tests.tiny_models import tiny_model

ARCHS = ["llama", "mistral", "qwen2", "gpt_neox", "falcon", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_auto_targets_the_attention_and_mlp_linears(arch: str) -> None:
    model = wrap(tiny_model(arch), MethodSection(name="lora"), LoraSection(r=4),
                 gradient_checkpointing=False)
    wrapped = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and len(module.lora_A)
    }
    assert wrapped == set(LORA_TARGETS[arch])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_auto_adapts_the_linears_a_release_has() -> None:
    """Mixtral's experts are nn.Linear w1, w2, w3 in transformers 4.37.2 and fused 3-D parameters
    in 5.x: auto adapts the experts where they are linears, else the attention alone."""
    from llmtrain import stack

    model = wrap(tiny_model("mixtral"), MethodSection(name="lora"), LoraSection(r=4),
                 gradient_checkpointing=False)
    wrapped = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and len(module.lora_A)
    }
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert wrapped == (attention if stack.is_current() else attention | {"w1", "w2", "w3"})


def test_unknown_architecture_lists_its_linear_layers() -> None:
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError) as info:
        wrap(model, MethodSection(name="lora"), LoraSection(), gradient_checkpointing=False)
    text = info.value.message()
    assert "mystery" in text and "q_proj" in text and "down_proj" in text


def test_explicit_targets_must_exist() -> None:
    with pytest.raises(ConfigError, match="not linear layers"):
        wrap(tiny_model("llama"), MethodSection(name="lora"),
             LoraSection(target_modules=["qkv"]), gradient_checkpointing=False)


def test_layers_last_n_blocks_and_head_count() -> None:
    model = tiny_model("llama")
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    head = model.lm_head.weight.numel()
    wrapped = wrap(model, MethodSection(name="layers", layers=["last:2", "lm_head"]),
                   LoraSection(), gradient_checkpointing=False)
    trainable, total = count_parameters(wrapped)
    assert trainable == 2 * per_block + head
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert all(p.requires_grad for p in model.model.layers[2].parameters())
    assert total == sum(p.numel() for p in model.parameters())


def test_layers_embeddings_and_globs() -> None:
    model = tiny_model("gpt_neox")
    chosen = select_parameters(model, ["embeddings", "gpt_neox.layers.0.mlp.*"])
    assert "gpt_neox.embed_in.weight" in chosen
    assert all(n == "gpt_neox.embed_in.weight" or n.startswith("gpt_neox.layers.0.mlp.")
               for n in chosen)
    assert len(chosen) == 5  # embedding + 2 weights + 2 biases


@pytest.mark.parametrize("pattern", ["last:9", "last:0", "nothing.matches.*"])
def test_bad_layer_selection_is_a_config_error(pattern: str) -> None:
    with pytest.raises(ConfigError):
        select_parameters(tiny_model("llama"), [pattern])


def test_full_trains_everything() -> None:
    model = tiny_model("qwen2")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = wrap(model, MethodSection(name="full"), LoraSection(), gradient_checkpointing=False)
    trainable, total = count_parameters(wrapped)
    assert trainable == total
    assert isinstance(wrapped, nn.Module)


@pytest.mark.parametrize("resized", [False, True], ids=["same-vocab", "resized"])
def test_adapter_saves_ask_no_hub_and_keep_embeddings_only_when_resized(
    tmp_path, monkeypatch: pytest.MonkeyPatch, resized: bool
) -> None:
    """peft's "auto" asked the Hub for the base's config.json at every save: from a local
    directory (how llmtrain loads models) peft 0.9.0 warned "Could not find a config file" and
    assumed the vocabulary unchanged, so a resized one lost its embeddings."""
    import warnings

    from peft.utils import save_and_load
    from safetensors import safe_open

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("asked the Hub")

    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_hub, raising=False)
    model = wrap(
        tiny_model("llama"), MethodSection(name="lora"), LoraSection(r=2),
        gradient_checkpointing=False,
    )  # fmt: skip
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    if resized:
        model.resize_token_embeddings(model.config.vocab_size + 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(str(tmp_path / "adapter"))
    assert not [w for w in caught if "config file" in str(w.message)]
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys)
    assert any("embed_tokens" in k for k in keys) == resized
    # A deep copy (a reference model, say) saves its own weights, not the original's.
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if "lora_B" in n).fill_(7.0)
    twin.save_pretrained(str(tmp_path / "twin"))
    with safe_open(str(tmp_path / "twin" / "adapter_model.safetensors"), "pt") as f:
        lora_b = [k for k in f.keys() if "lora_B" in k]  # noqa: SIM118 (not iterable)
        assert lora_b and any(bool((f.get_tensor(k) == 7.0).all()) for k in lora_b)


def test_adapter_saves_survive_pickling(tmp_path) -> None:
    """torch.save(model) / pickle: the save decision travels with the model (a bound method
    pickled as getattr(model, '_save_pretrained') and failed to load)."""
    import pickle

    from safetensors import safe_open

    model = wrap(
        tiny_model("llama"), MethodSection(name="lora"), LoraSection(r=2),
        gradient_checkpointing=False,
    )  # fmt: skip
    twin = pickle.loads(pickle.dumps(model))
    assert twin.save_pretrained.model is twin
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if "lora_B" in n).fill_(7.0)
    twin.save_pretrained(str(tmp_path / "twin"))
    with safe_open(str(tmp_path / "twin" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not any("embed_tokens" in k for k in keys)
        assert any(bool((f.get_tensor(k) == 7.0).all()) for k in keys if "lora_B" in k)


def test_lora_wraps_a_model_whose_config_keeps_the_vocabulary_in_its_text_config(
    tmp_path,
) -> None:
    """transformers 5.x's Gemma3ForConditionalGeneration (AutoModelForCausalLM for a gemma3
    checkpoint): Gemma3Config has no vocab_size of its own (AttributeError at wrap before)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma3Config"):
        pytest.skip("no Gemma-3 in this transformers")
    from transformers import AutoModelForCausalLM, Gemma3Config

    config = Gemma3Config(
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 8},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4,
    )  # fmt: skip
    model = wrap(
        AutoModelForCausalLM.from_config(config), MethodSection(name="lora"),
        LoraSection(r=2, target_modules=["q_proj", "v_proj"]), gradient_checkpointing=False,
    )  # fmt: skip
    model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
