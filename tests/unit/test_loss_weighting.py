"""Token-weighted loss per optimizer step (loss_weighting): the counts each step divides by,
through accelerate's own batch sharding, and the loss and gradient of two samples with 4 and
36 loss tokens in three layouts. Model: the embedded tiny Llama (SentencePiece tokenizer)."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from peft import LoraConfig, get_peft_model
from torch.utils.data import BatchSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llmtrain.config import load_config, resolve_path
from llmtrain.data.collate import PadCollator
from llmtrain.errors import ConfigError
from llmtrain.kernels import loss as fused_loss
from llmtrain.kernels.varlen_attention import PackingCollator
from llmtrain.labels import IGNORE_INDEX
from llmtrain.plan import World
from llmtrain.train import loss_weighting
from llmtrain.train.run import plan_run, training_arguments
from llmtrain.train.trainer import LossRecorder
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("rows", "batch", "ranks", "accum"),
    [(17, 3, 2, 2), (5, 1, 2, 1), (10, 2, 3, 2), (7, 2, 1, 3), (2, 1, 2, 1), (1, 4, 2, 2)],
)
def test_each_step_divides_by_the_tokens_its_ranks_see(
    rows: int, batch: int, ranks: int, accum: int
) -> None:
    counts = np.random.default_rng(rows).integers(0, 50, size=rows)
    sampler = loss_weighting.StepTokenSampler(counts, seed=3, step_samples=batch * ranks * accum)
    for _epoch in range(2):
        sampler.set_epoch(_epoch)
        order = list(sampler)  # one epoch as every rank's sampler yields it
        per_rank = []
        for rank in range(ranks):  # accelerate 0.26's sharding, as Trainer.get_train_dataloader
            shard = BatchSamplerShard(BatchSampler(order, batch, False), ranks, rank)
            per_rank.append(list(shard))
        assert len({len(b) for b in per_rank}) == 1  # same micro-batch count on every rank
        assert len(per_rank[0]) % accum == 0  # no accumulation group crosses the epoch's end
        seen = [item.row for b in per_rank for mb in b for item in mb]
        real = sorted(r for r in seen if r != loss_weighting.FILLER)
        assert real == list(range(rows))  # every row once: no repeats to even out the ranks
        for step in range(len(per_rank[0]) // accum):
            items = [
                item for b in per_rank for mb in b[step * accum : (step + 1) * accum] for item in mb
            ]
            truth = sum(int(counts[i.row]) for i in items if i.row != loss_weighting.FILLER)
            assert {i.step_tokens for i in items} == {truth}


def test_sample_counts_are_the_collated_batches_tokens() -> None:
    labels = [[-100, -100, 5, 6, 7], [8, 9], [-100, 4], [3]]
    ds = datasets.Dataset.from_dict({"input_ids": labels, "labels": labels})
    ds = ds.select([3, 0, 2, 1])  # a view with an indices mapping
    counts = loss_weighting.sample_loss_tokens(ds)
    assert counts.tolist() == [0, 3, 1, 1]
    feats = [dict(r) for r in ds]
    for collate in (PadCollator(0), PackingCollator()):
        assert int(loss_weighting.loss_tokens(collate(feats)["labels"])) == counts.sum()


def test_a_miscount_is_caught_when_logged() -> None:
    recorder = LossRecorder()
    recorder.add(torch.tensor(1.0), torch.tensor(7), 8)
    recorder.close_step()
    with pytest.raises(RuntimeError, match=r"divided by 8 loss tokens but .* held 7"):
        recorder.drain()


def test_chunked_loss_sums() -> None:
    model = embedded()
    ours = copy.deepcopy(model)
    assert fused_loss.patch_causal_lm_loss(ours)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    tokens = int(loss_weighting.loss_tokens(labels))
    mean = model(input_ids=ids, labels=labels).loss
    summed = loss_weighting.token_loss_sum(ours, {"input_ids": ids, "labels": labels}, True)
    plain = loss_weighting.token_loss_sum(model, {"input_ids": ids, "labels": labels}, False)
    torch.testing.assert_close(summed, mean * tokens)
    torch.testing.assert_close(plain, mean * tokens)


def embedded() -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        resolve_path("embedded:tiny-llama"), torch_dtype=torch.float32
    )
    return model.train()


def two_samples() -> list[dict[str, list[int]]]:
    """Instruction rows as llmtrain tokenizes them: 4 and 36 loss tokens after the shift."""
    tok = AutoTokenizer.from_pretrained(resolve_path("embedded:tiny-llama"))
    rows = [
        ("Question: What is 7 plus 4?\nAnswer:", " 11"),
        (
            "Question: How many?\nAnswer:",
            " There are 9 cats on the table and 2 more in the box. If you have 1 keys and get "
            "5 more, you hold a number of keys.",
        ),
    ]
    out = []
    for prompt, response in rows:
        ids = [*tok(prompt + response).input_ids, tok.eos_token_id]
        n = len(tok(prompt).input_ids)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n + ids[n:]})
    assert [int(loss_weighting.loss_tokens(torch.tensor(s["labels"]))) for s in out] == [4, 36]
    return out


def step(
    model: PreTrainedModel,
    micro_batches: list[list[dict[str, list[int]]]],
    accum: int,
    ranks: int,
    weighted: bool,
) -> tuple[float, torch.Tensor]:
    """One optimizer step as the Trainer makes it: per rank, `accum` micro-batches whose losses
    accelerate divides by `accum` before backward; DDP then averages the ranks' gradients.
    `weighted`: llmtrain's loss (loss_weighting), else transformers 4.37.2's per-batch mean.
    Returns the logged loss (mean over ranks of the summed micro-batch losses / accum) and
    the averaged gradient of the trained parameters, flattened."""
    collate = PadCollator(0)
    batches = [collate(copy.deepcopy(mb)) for mb in micro_batches]
    step_tokens = sum(int(loss_weighting.loss_tokens(b["labels"])) for b in batches)
    logged, grads = 0.0, []
    per_rank = len(batches) // ranks
    for rank in range(ranks):  # rank r gets micro-batches r, r + ranks, ... (accelerate)
        replica = copy.deepcopy(model)
        for b in batches[rank::ranks][:per_rank]:
            if weighted:
                loss = loss_weighting.token_loss_sum(replica, b, False) * (
                    loss_weighting.backward_scale(step_tokens, accum, ranks)
                )
            else:
                loss = replica(**b).loss
            (loss / accum).backward()
            logged += float(loss.detach()) / accum / ranks
        grads.append(
            torch.cat([p.grad.flatten() for p in replica.parameters() if p.grad is not None])
        )
    return logged, torch.stack(grads).mean(0)


def lora(model: PreTrainedModel) -> PreTrainedModel:
    torch.manual_seed(0)
    wrapped = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    for name, p in wrapped.named_parameters():  # B is zero at init: give it a trained value
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    return wrapped


@pytest.mark.parametrize("method", ["full", "lora"])
def test_4_and_36_tokens(method: str) -> None:
    model = embedded() if method == "full" else lora(embedded())
    a, b = two_samples()
    layouts = {  # name: (micro-batches in order, accumulation, ranks)
        "batch2": ([[a, b]], 1, 1),
        "batch1-accum2": ([[a], [b]], 2, 1),
        "2ranks-batch1": ([[a], [b]], 1, 2),
    }
    per_sample = [float(model(**PadCollator(0)([s])).loss.detach()) for s in (a, b)]
    token_mean = (4 * per_sample[0] + 36 * per_sample[1]) / 40
    mean_of_means = sum(per_sample) / 2

    old = {k: step(model, mbs, acc, r, weighted=False) for k, (mbs, acc, r) in layouts.items()}
    assert old["batch2"][0] == pytest.approx(token_mean, rel=1e-5)
    for name in ("batch1-accum2", "2ranks-batch1"):  # the fault: per-micro-batch means
        assert old[name][0] == pytest.approx(mean_of_means, rel=1e-5)
        change = float((old[name][1] - old["batch2"][1]).norm() / old["batch2"][1].norm())
        assert change > 0.1, change

    new = {k: step(model, mbs, acc, r, weighted=True) for k, (mbs, acc, r) in layouts.items()}
    reference = new["batch2"][1]
    torch.testing.assert_close(reference, old["batch2"][1], rtol=1e-5, atol=1e-7)
    for name, (loss, grad) in new.items():
        assert loss == pytest.approx(token_mean, rel=1e-5), name
        assert float((grad - reference).norm() / reference.norm()) < 1e-5, name


def test_a_trainer_that_counts_another_world_is_refused(tmp_path: Path) -> None:
    """The sharding above holds only if the Trainer counts the launcher's processes; one that
    counts fewer (here: one process that claims a world of two) is refused before training.
    tests/strategies/test_ddp_sharding.py checks a real world of two on CPU."""
    two = World(rank=0, local_rank=0, world_size=2)
    cfg = load_config(REPO / "configs" / "full.yaml", ["training.report_to=[none]"])
    with pytest.raises(ConfigError, match="counts 1 process"):
        training_arguments(cfg, two, plan_run(cfg, two), tmp_path, False, None)
