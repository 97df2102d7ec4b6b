"""bf16 parameters with fp32 master weights in the optimizer (training.param_dtype=bfloat16).

The default full fine-tune keeps fp32 parameters and lets autocast cast every weight to bf16 in
every forward (and again in a checkpointed recompute): on an H200 those casts were 5% of a
fixed-length step and 14% of a variable-length one (bench/RESULTS.md, the profile of
2026-12-01). Here the model holds bf16 weights, so no cast runs, and the optimizer steps an fp32
copy of each (the master weight), the scheme of mixed-precision training (Micikevicius et al.
2018, "Mixed Precision Training", section 3.1) as Megatron-LM keeps it for bf16 (main params and
main grads in fp32):

- after each micro-batch's backward, `accumulate` adds each bf16 gradient into an fp32 master
  gradient and frees it, so accumulation over micro-batches sums in fp32 as the fp32 path does;
- before the optimizer step the master gradients are clipped to `max_grad_norm` (the Trainer's
  own clipping sees no gradients: run.py turns it off). With fused Adam(W), llmtrain's default
  on a GPU, the clip is folded into the optimizer's own kernel: its `grad_scale` (the hook
  torch.cuda.amp.GradScaler unscales through) divides each gradient by 1 / clip coefficient as
  the kernel reads it, which saves a pass over every fp32 gradient (2.4 ms of a 229 ms
  fixed-1b-full step on an H200, bench/RESULTS.md 2026-12-02);
- after it, each bf16 parameter becomes its master weight rounded to bf16, and the master
  gradients are freed;
- the optimizer's state_dict carries the master weights, so a resumed run continues from the
  fp32 values, not from the rounded bf16 ones (exact resume).

One process only (plan.py refuses the rest): under DDP the gradients of earlier micro-batches
would leave the model before the all-reduce of the last one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

STATE_KEY = "llmtrain_master_weights"  # in the optimizer's state_dict: the fp32 masters, in order


def _divides_by_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step` divides every gradient by `optimizer.grad_scale` (a tensor) in
    its kernel: torch's fused Adam and AdamW (their step passes `getattr(self, "grad_scale")`
    to the fused kernel; the other implementations refuse one)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
        g.get("fused") for g in optimizer.param_groups
    )


class MasterWeights:
    """fp32 master copies of the 16-bit parameters an optimizer trains (made by `attach`).

    Args:
        max_grad_norm: clip the master gradients to this total L2 norm before each step; 0: off.
    """

    def __init__(self, max_grad_norm: float) -> None:
        self.params: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy each parameter of `optimizer` (made over the bf16 parameters, before its first
        step) to an fp32 master on the same device, point the optimizer at the masters, and
        hook its step and state_dict. The Trainer calls create_optimizer after it has moved the
        model to its device, so the masters are made there.

        Raises:
            ValueError: the optimizer already has state (it must not have stepped).
        """
        if optimizer.state:
            raise ValueError("attach master weights before the optimizer's first step")
        for group in optimizer.param_groups:
            masters = [p.detach().float().requires_grad_(True) for p in group["params"]]
            self.params += group["params"]
            self.masters += masters
            group["params"] = masters
        optimizer.register_step_pre_hook(lambda opt, *_: self._clip(opt))
        optimizer.register_step_post_hook(lambda *_: self._publish())
        optimizer.register_state_dict_post_hook(self._save)
        optimizer.register_load_state_dict_pre_hook(self._load)
        n = sum(m.numel() for m in self.masters)
        log.info("bf16 parameters, fp32 master weights in the optimizer: %d tensors, %d values",
                 len(self.masters), n)

    @torch.no_grad()
    def accumulate(self) -> None:
        """Move each parameter's 16-bit gradient into its master's fp32 gradient (summed).

        Each list goes to the GPU in a few multi-tensor launches (torch._foreach_copy_ and
        _foreach_add_), as `_publish` does, not one kernel per tensor: the GPU outran 200
        per-tensor launches a step and waited for them (fixed-1b-full +0.8% tokens/s on an H200,
        bench/RESULTS.md, 2026-12-02)."""
        first_to: list[torch.Tensor] = []
        first_from: list[torch.Tensor] = []
        later_to: list[torch.Tensor] = []
        later_from: list[torch.Tensor] = []
        for p, m in zip(self.params, self.masters, strict=True):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)
                first_to.append(m.grad)
                first_from.append(p.grad)
            else:
                later_to.append(m.grad)
                later_from.append(p.grad)
            p.grad = None
        if first_to:
            torch._foreach_copy_(first_to, first_from)
        if later_to:
            torch._foreach_add_(later_to, later_from)

    def _clip(self, optimizer: torch.optim.Optimizer) -> None:
        self.accumulate()  # a gradient left by a backward that training_step did not see
        if self.max_grad_norm <= 0:
            return
        trained = [m for m in self.masters if m.grad is not None]
        if not trained or not _divides_by_grad_scale(optimizer):  # none: clip_grad_norm_'s 0
            self.last_grad_norm = nn.utils.clip_grad_norm_(trained, self.max_grad_norm)
            return
        grads = [m.grad for m in trained if m.grad is not None]
        # clip_grad_norm_'s arithmetic: total L2 norm, coefficient max / (norm + 1e-6) capped
        # at 1; the kernel divides by its inverse instead of the gradients being multiplied.
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
        optimizer.grad_scale = torch.clamp((total + 1e-6) / self.max_grad_norm, min=1.0)  # type: ignore[attr-defined]
        self.last_grad_norm = total

    @torch.no_grad()
    def _publish(self) -> None:
        torch._foreach_copy_(list[torch.Tensor](self.params), self.masters)
        for m in self.masters:
            m.grad = None

    def _save(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[STATE_KEY] = [m.detach() for m in self.masters]
        return state_dict

    @torch.no_grad()
    def _load(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Restore the masters (and their bf16 parameters) from a saved state. A state saved
        with fp32 parameters has none (checkpoints.check_topology stops that resume unless
        distributed.allow_topology_change): the masters then stay the loaded weights.

        Raises:
            ValueError: the saved masters have other shapes than this model's parameters.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop(STATE_KEY, None)
        if saved is None:
            log.warning("the checkpoint holds no master weights (saved with fp32 parameters): "
                        "the masters start from its weights")
            return state_dict
        if [t.shape for t in saved] != [m.shape for m in self.masters]:
            raise ValueError("the checkpoint's master weights do not fit this model")
        for p, m, s in zip(self.params, self.masters, saved, strict=True):
            m.copy_(s)
            p.copy_(m)
        return state_dict
