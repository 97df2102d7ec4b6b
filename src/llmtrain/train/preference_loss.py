"""The preference losses (DPO and its loss types, ORPO's odds-ratio term), their reward metrics
and the per-sequence log-probabilities they take, as plain functions of tensors.

The reference implementation is TRL 0.8.6 (`trl/trainer/dpo_trainer.py`: `DPOTrainer.dpo_loss`,
`DPOTrainer.get_batch_logps`; `trl/trainer/orpo_trainer.py`: `ORPOTrainer.odds_ratio_loss`):
the same operations in the same order, so the results are TRL 0.8.6's bit for bit
(tests/unit/test_preference.py compares them on the pinned stack).

Why not TRL's own functions: TRL 1.x (the current stack's 1.16) no longer exposes these losses
as functions. Its `DPOTrainer` has no `dpo_loss` or `get_batch_logps` (the loss is inlined in
`DPOTrainer._compute_loss`, and its `ipo` averages the log-probabilities over tokens where
0.8.6 sums them), and `trl.trainer.orpo_trainer` is gone: ORPO lives on in
`trl.experimental.orpo`, which TRL declares unstable ("may change or be removed without
notice") and which warns on import. Owning these few lines keeps one loss on both stacks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from llmtrain.labels import IGNORE_INDEX

# The loss types config.PreferenceSection accepts (TRL 0.8.6's names).
DpoLossType = Literal["sigmoid", "hinge", "ipo"]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, average: bool) -> torch.Tensor:
    """Log-probability of each sequence's labelled tokens (TRL 0.8.6's `get_batch_logps`).

    The token at position t is predicted by the logits at t-1 (labels shifted left by one);
    labels equal to IGNORE_INDEX (-100) count for nothing.

    Args:
        logits: [N, L, V], any float dtype; the result has that dtype (the caller upcasts to
            fp32 first so that the log-softmax is computed in fp32).
        labels: int64 [N, L], IGNORE_INDEX where no loss is taken.
        average: False: the sum over the labelled tokens (DPO); True: their mean (ORPO). A
            sequence without labelled tokens gives 0 (sum) or NaN (mean, 0/0).

    Returns:
        [N], in nats (natural log), at most 0.

    Raises:
        ValueError: logits.shape[:-1] != labels.shape.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in batch or "
            "sequence length"
        )
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    mask = labels != IGNORE_INDEX
    labels[~mask] = 0  # any valid index: masked out below
    per_token = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    if average:
        return (per_token * mask).sum(-1) / mask.sum(-1)
    return (per_token * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: DpoLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and implicit rewards (TRL 0.8.6's `DPOTrainer.dpo_loss`, with a
    reference model).

    With h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
      sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h); eps = 0 is DPO
          (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), eps > 0 the
          conservative DPO of the cDPO report (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf).
      hinge: max(0, 1 - beta h), the SLiC loss (Zhao et al. 2023, arXiv:2305.10425).
      ipo: (h - 1 / (2 beta))^2, IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17; beta is the
          paper's tau), on summed log-probabilities as in TRL 0.8.6.
    label_smoothing applies to sigmoid only (TRL 0.8.6 ignores it for hinge and ipo).

    Args:
        policy_chosen, policy_rejected, reference_chosen, reference_rejected: [B], the summed
            log-probabilities of each pair's chosen and rejected answer under the policy and the
            reference model (sequence_logps, average=False); float, all one dtype and device.
        beta: > 0, the KL strength (the temperature of the reward margin).
        loss_type: sigmoid, hinge or ipo.
        label_smoothing: in [0, 0.5), the assumed share of flipped pairs.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each [B] in the inputs' dtype; the rewards
        are beta x (policy - reference) log-probabilities, detached.

    Raises:
        ValueError: an unknown loss_type.
    """
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: use sigmoid, hinge or ipo")
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def log_odds_ratio(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> torch.Tensor:
    """log(odds(y_w) / odds(y_l)) with odds(y) = P(y) / (1 - P(y)) (Hong et al. 2024, "ORPO",
    eq. 4 and 7), from log-probabilities by log identities as TRL 0.8.6 does.

    Args:
        policy_chosen, policy_rejected: [B], the mean token log-probabilities of each answer
            (sequence_logps, average=True), < 0; float.

    Returns:
        [B], in the inputs' dtype.
    """
    return (policy_chosen - policy_rejected) - (
        torch.log1p(-torch.exp(policy_chosen)) - torch.log1p(-torch.exp(policy_rejected))
    )


def odds_ratio_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term and rewards (TRL 0.8.6's `ORPOTrainer.odds_ratio_loss`).

    Returns lambda x log sigma(log odds ratio) (Hong et al. 2024, eq. 6-7, with lambda =
    `beta`): ORPO's per-pair loss is the chosen answer's NLL minus this term (orpo_loss).

    Args:
        policy_chosen, policy_rejected: [B], mean token log-probabilities (< 0); float.
        beta: > 0, ORPO's lambda.

    Returns:
        (term, chosen_rewards, rejected_rewards), each [B] in the inputs' dtype; term <= 0, the
        rewards are beta x the log-probabilities, detached.
    """
    # log(sigmoid(.)) rather than logsigmoid: TRL 0.8.6's operations, hence its exact values.
    term = beta * torch.log(torch.sigmoid(log_odds_ratio(policy_chosen, policy_rejected)))
    return term, beta * policy_chosen.detach(), beta * policy_rejected.detach()


def orpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss (Hong et al. 2024, eq. 6): the chosen answer's mean token NLL minus
    lambda x log sigma(log odds ratio). TRL 0.8.6's ORPOTrainer takes the NLL term as one token
    mean over the whole batch; here it is each pair's, so that a step's loss is the mean over
    its pairs like DPO's.

    Args:
        policy_chosen, policy_rejected: [B], mean token log-probabilities (< 0); float.
        beta: > 0, ORPO's lambda.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each [B] in the inputs' dtype.
    """
    term, chosen_rewards, rejected_rewards = odds_ratio_loss(
        policy_chosen, policy_rejected, beta=beta
    )
    return -policy_chosen - term, chosen_rewards, rejected_rewards
