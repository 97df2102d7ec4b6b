"""bf16 parameters with fp32 master weights in the optimizer (training.param_dtype=bfloat16).

The default full fine-tune keeps fp32 parameters and lets autocast cast every weight to bf16 in
every forward (and again in a checkpointed recompute): on an H200 those casts were 5% of a
fixed-length step and 14% of a variable-length one (bench/RESULTS.md, the profile of
2026-12-01). Here the model holds bf16 weights, so no cast runs, and the optimizer steps an fp32
copy of each (the master weight), the scheme of mixed-precision training (Micikevicius et al.
2018, "Mixed Precision Training", section 3.1) as Megatron-LM keeps it for bf16 (main params and
main grads in fp32):

- after each micro-batch's backward, `accumulate` takes each bf16 gradient off its parameter;
  from the second micro-batch of a step on, they are summed into an fp32 master gradient, so
  accumulation over micro-batches sums in fp32 as the fp32 path does;
- before the optimizer step the master gradients are clipped to `max_grad_norm` (the Trainer's
  own clipping sees no gradients: run.py turns it off). With fused Adam(W), llmtrain's default
  on a GPU, the clip is folded into the optimizer's own kernel: its `grad_scale` (the hook
  torch.cuda.amp.GradScaler unscales through) divides each gradient by 1 / clip coefficient as
  the kernel reads it, which saves a pass over every fp32 gradient (2.4 ms of a 229 ms
  fixed-1b-full step on an H200, bench/RESULTS.md 2026-12-02);
- after it, each bf16 parameter becomes its master weight rounded to bf16, and the master
  gradients are freed;
- on CUDA with torch's fused AdamW, llmtrain's one-pass kernel (kernels/master_adamw.py) does
  the step instead: it reads the gradient as it is (bf16 after a single micro-batch), updates
  the master and its moments and writes the bf16 parameter, and torch's step then finds no
  gradient to apply (fixed-1b-full on an H200: bench/RESULTS.md, 2026-12-02);
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

from llmtrain.kernels import master_adamw

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
        # Each parameter's gradient from the step's first micro-batch, in its own 16-bit dtype,
        # until a second one arrives (then summed into the master's fp32 .grad) or the step.
        self.pending: list[torch.Tensor | None] = []
        # Each master's AdamW step count as the host knows it (the state's own is a tensor on
        # the GPU, which the one-pass kernel must not read: a sync).
        self.steps: list[int] = []
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None
        self.one_pass = False  # step with kernels/master_adamw.py (decided by attach)

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
        why_not = master_adamw.unusable_here() or master_adamw.unusable_for(optimizer)
        for group in optimizer.param_groups:
            masters = [p.detach().float().requires_grad_(True) for p in group["params"]]
            self.params += group["params"]
            self.masters += masters
            group["params"] = masters
        self.pending = [None] * len(self.params)
        self.steps = [0] * len(self.params)
        self.one_pass = why_not is None
        log.info("fp32 master weights: %s", "stepped by llmtrain's one-pass AdamW kernel"
                 if why_not is None else f"stepped by torch's optimizer ({why_not})")
        # optimizer.zero_grad clears the masters' .grad; it must drop the pending 16-bit
        # gradients too (a micro-batch the caller discards), as it did when they went straight
        # into .grad.
        zero_grad = optimizer.zero_grad

        def drop_pending_too(set_to_none: bool = True) -> None:
            self.pending = [None] * len(self.masters)
            zero_grad(set_to_none)

        optimizer.zero_grad = drop_pending_too  # type: ignore[method-assign]
        optimizer.register_step_pre_hook(lambda opt, *_: self._clip(opt))
        optimizer.register_step_post_hook(lambda *_: self._publish())
        optimizer.register_state_dict_post_hook(self._save)
        optimizer.register_load_state_dict_pre_hook(self._load)
        n = sum(m.numel() for m in self.masters)
        log.info("bf16 parameters, fp32 master weights in the optimizer: %d tensors, %d values",
                 len(self.masters), n)

    @torch.no_grad()
    def accumulate(self) -> None:
        """Take each parameter's 16-bit gradient off it: the step's first one is kept as it is
        (`pending`), later ones are summed into the master's fp32 gradient (with the first).

        Each list goes to the GPU in a few multi-tensor launches (torch._foreach_copy_ and
        _foreach_add_), as `_publish` does, not one kernel per tensor: the GPU outran 200
        per-tensor launches a step and waited for them (fixed-1b-full +0.8% tokens/s on an H200,
        bench/RESULTS.md, 2026-12-02)."""
        arrived = [i for i, p in enumerate(self.params) if p.grad is not None]
        # A second gradient: the first goes into fp32 (below), the new one is added to it.
        self._flush_pending([i for i in arrived if self.pending[i] is not None])
        later = [
            (total, new)
            for i in arrived
            if (total := self.masters[i].grad) is not None
            and (new := self.params[i].grad) is not None
        ]
        if later:
            torch._foreach_add_([t for t, _ in later], [n for _, n in later])
        for i in arrived:
            if self.masters[i].grad is None:
                self.pending[i] = self.params[i].grad
            self.params[i].grad = None

    def _flush_pending(self, indices: list[int] | None = None) -> None:
        """The pending 16-bit gradients of `indices` (default: all) into their masters' fp32
        .grad, where torch's optimizer reads them: one multi-tensor copy."""
        chosen = [
            (i, g)
            for i in (range(len(self.masters)) if indices is None else indices)
            if (g := self.pending[i]) is not None
        ]
        if not chosen:
            return
        grads = [torch.empty_like(self.masters[i]) for i, _ in chosen]
        torch._foreach_copy_(grads, [g for _, g in chosen])
        for (i, _), g in zip(chosen, grads, strict=True):
            self.masters[i].grad = g
            self.pending[i] = None

    def _clip(self, optimizer: torch.optim.Optimizer) -> None:
        self.accumulate()  # a gradient left by a backward that training_step did not see
        if self.one_pass:
            self._one_pass_step(optimizer)
            return
        self._flush_pending()
        if self.max_grad_norm <= 0:
            return
        trained = [m for m in self.masters if m.grad is not None]
        if not trained or not _divides_by_grad_scale(optimizer):  # none: clip_grad_norm_'s 0
            self.last_grad_norm = nn.utils.clip_grad_norm_(trained, self.max_grad_norm)
            return
        grads = [m.grad for m in trained if m.grad is not None]
        optimizer.grad_scale = self._clip_scale(grads)  # type: ignore[attr-defined]

    def _clip_scale(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """1 / clip_grad_norm_'s coefficient (total L2 norm in fp32, max / (norm + 1e-6) capped
        at 1), for a kernel that divides each gradient by it; sets last_grad_norm."""
        if all(g.dtype == torch.float32 for g in grads):
            norms = torch._foreach_norm(grads)
        else:  # 16-bit gradients (the one-pass path, torch >= 2.8): summed in fp32
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
        self.last_grad_norm = total
        return torch.clamp((total + 1e-6) / self.max_grad_norm, min=1.0)

    def _one_pass_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step every master with a gradient by kernels/master_adamw.py, then take the
        gradients away so that torch's own step (which runs next) has nothing to apply."""
        chosen = [i for i, (m, g) in enumerate(zip(self.masters, self.pending, strict=True))
                  if g is not None or m.grad is not None]
        if chosen:
            grads: list[torch.Tensor] = []
            for i in chosen:
                grad = self.masters[i].grad
                grad = self.pending[i] if grad is None else grad  # bf16, or the fp32 sum
                assert grad is not None
                grads.append(grad)
                self.steps[i] += 1
            scale = (self._clip_scale(grads) if self.max_grad_norm > 0
                     else torch.ones((), device=grads[0].device))
            assert isinstance(optimizer, torch.optim.AdamW)
            master_adamw.step(
                optimizer, [self.masters[i] for i in chosen], grads,
                [self.params[i] for i in chosen], scale, [self.steps[i] for i in chosen],
            )  # fmt: skip
        elif self.max_grad_norm > 0:
            self.last_grad_norm = torch.zeros(())  # clip_grad_norm_'s answer for no gradient
        for m in self.masters:
            m.grad = None
        self.pending = [None] * len(self.masters)

    @torch.no_grad()
    def _publish(self) -> None:
        if self.one_pass:  # the kernel wrote them, and dropped the gradients
            return
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
        # The host's step counts, from the saved state (CPU tensors or numbers: no GPU sync).
        saved_state = state_dict.get("state", {})
        self.steps = [int(saved_state.get(i, {}).get("step", 0)) for i in range(len(self.masters))]
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
