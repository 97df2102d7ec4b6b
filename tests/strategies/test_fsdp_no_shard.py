"""compat.fsdp_no_shard_frozen_views under real FSDP1 on CPU: one gloo process under torchrun,
a world of one, which FSDP runs as NO_SHARD (as on one GPU), LoRA through peft and peft's wrap
policy, as train/strategies.py sets them up, with gradient accumulation (no_sync) and an
evaluation forward between optimizer steps, as the Trainer runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain import compat
from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not compat.needs_fsdp_no_shard_frozen_views(),
        reason="the current stack runs FSDP2, which has no NO_SHARD units; the shim is off there",
    ),
]

SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from peft import LoraConfig, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardedStateDictConfig, StateDictType
from transformers import LlamaConfig, LlamaForCausalLM
from llmtrain import compat

mode, out, tied = sys.argv[1], sys.argv[2], sys.argv[3] == "tied"
dist.init_process_group("gloo")
torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                     tie_word_embeddings=tied)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"]))
model = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
             device_id=torch.device("cpu"))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
trained = [id(p) for g in optimizer.param_groups for p in g["params"]]
base = next(m for name, m in model.named_modules() if name.endswith("q_proj.base_layer"))
result = {"no_shard": all(not u._handle.uses_sharded_strategy
                          for u in FSDP.fsdp_modules(model) if u._handle is not None)}

def loss():
    ids = torch.randint(0, 128, (2, 8))
    return model(input_ids=ids, labels=ids).loss

def step():  # two micro-batches, the first without gradient sync, as accelerate accumulates
    with model.no_sync():
        loss().backward()
    loss().backward()
    optimizer.step()
    optimizer.zero_grad()

def keys():
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig()):
        return sorted(model.state_dict())

if mode == "shim":
    compat.fsdp_no_shard_frozen_views(model)  # what LlmtrainTrainer.training_step does first
step()
# FSDP's state-dict hook would assert on this: the frozen weight is a plain Tensor now.
result["parameter_after_step"] = isinstance(base.weight, torch.nn.Parameter)
if mode == "restore_at_save":
    # Making the views Parameters only before the state dict comes too late: the second
    # micro-batch's forward had adopted the Tensor views as the unit's parameters.
    for unit in FSDP.fsdp_modules(model):
        unit._handle._use_sharded_views()
    result["parameter_after_restore"] = isinstance(base.weight, torch.nn.Parameter)
if mode == "shim":
    with torch.no_grad():
        loss()  # an evaluation between steps
    step()
    compat.fsdp_no_shard_frozen_views(model)  # what _save_checkpoint and save_model do
    result["parameter_after_shim"] = isinstance(base.weight, torch.nn.Parameter)
    result["keys"] = keys()
    step()  # training goes on after the checkpoint, with the optimizer's own parameters
    compat.fsdp_no_shard_frozen_views(model)
    result["after"] = keys()
    result["same_parameters"] = trained == [id(p) for p in model.parameters() if p.requires_grad]
json.dump(result, open(out, "w"))
"""


def run(tmp_path: Path, mode: str, tied: bool) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The script under torchrun in one process; returns the process and its result file."""
    script = tmp_path / "no_shard.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{mode}-{'tied' if tied else 'untied'}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
         str(script), mode, str(out), "tied" if tied else "untied"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    return proc, out


def result(tmp_path: Path, mode: str, *, tied: bool = False) -> dict[str, object]:
    proc, out = run(tmp_path, mode, tied)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded: dict[str, object] = json.loads(out.read_text())
    return loaded


def test_frozen_units_are_in_the_state_dict_of_a_no_shard_lora_run(tmp_path: Path) -> None:
    """After an accumulated step FSDP leaves a frozen unit's weights as plain tensors (its
    state-dict hook then asserts that LoRA's base_layer.weight is missing), and making them
    parameters only at save time is too late; with the shim from the start they stay the
    optimizer's own parameters, and every weight is in the state dict after steps and an
    evaluation, before and after a further step."""
    assert result(tmp_path, "plain") == {"no_shard": True, "parameter_after_step": False}
    assert result(tmp_path, "restore_at_save")["parameter_after_restore"] is False
    fixed = result(tmp_path, "shim")
    base = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert fixed["no_shard"] is True and fixed["parameter_after_shim"] is True
    assert base in fixed["keys"] and fixed["keys"] == fixed["after"]  # type: ignore[operator]
    assert fixed["same_parameters"] is True


def test_tied_embeddings_train_and_save(tmp_path: Path) -> None:
    """With tied input and output embeddings (SmolLM2, Llama-3.2 1B) the Tensors left by the
    backward crash the next step's reshard of the shared weight, before any save; with the
    shim the run trains, and the state dict has every weight."""
    plain, _ = run(tmp_path, "plain", tied=True)
    assert plain.returncode != 0 and "prim_param" in plain.stderr, plain.stderr[-3000:]
    fixed = result(tmp_path, "shim", tied=True)
    assert "base_model.model.model.embed_tokens.weight" in fixed["keys"]  # type: ignore[operator]
    assert fixed["keys"] == fixed["after"] and fixed["same_parameters"] is True
