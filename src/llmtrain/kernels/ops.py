"""The memory-bound pieces of Llama-style blocks, optionally fused by torch.compile.

transformers 4.37.2 runs RMSNorm (with an fp32 upcast), SwiGLU and rotary embeddings as chains
of small kernels, each reading and writing whole activations: on a GPU a large share of a step.
The eager functions below do the same arithmetic as transformers; `compiled(name)` returns the
same function through torch.compile (one graph per function, shared by every layer, not one per
module), and `compile_blocks` swaps them into a model's norms and MLPs. Compilation needs a
working torch.compile (Triton on CUDA) and is opt-in: training.compile.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from llmtrain import stack
from llmtrain.labels import IGNORE_INDEX

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm (RMSNorm: Zhang and Sennrich 2019, arXiv:1910.07467): normalise in fp32,
    cast back, then scale. x: [..., hidden], any float dtype; weight: [hidden]; eps: added to
    the mean square. The result has x's shape, in the promotion of weight's and x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one pass: (residual + delta, its norm).

    residual and delta: [..., hidden], one dtype; weight: [hidden]. Both results have the
    inputs' shape; the norm follows rms_norm's dtype rule."""
    total = residual + delta
    return total, rms_norm(total, weight, eps)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype, once, for several matmuls that would each cast it again.

    The forward values are autocast's own; in the backward the branches' gradients are summed
    in that dtype before the one cast back, instead of in fp32 after three casts."""
    dtype = autocast_dtype(x.device.type)
    return x if dtype is None or x.dtype != torch.float32 else x.to(dtype)


def autocast_dtype(kind: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type now, None when it is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    if kind == "cuda" and torch.is_autocast_enabled():  # torch 2.3 (NGC 24.04)
        return torch.get_autocast_gpu_dtype()
    return None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Shazeer 2020, arXiv:2002.05202) as LlamaMLP computes it: silu(gate) * up, both
    [..., intermediate] in one dtype, which the result keeps."""
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embeddings (RoFormer: Su et al. 2021, arXiv:2104.09864) in transformers'
    rotate-half layout, with cos/sin already gathered at each token's position.

    q: [..., heads, head_dim], k: [..., kv_heads, head_dim]; cos, sin: broadcastable to them
    (e.g. [tokens, 1, head_dim]). Returns the rotated (q, k) in their dtypes."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 over (16-bit) logits: transformers' upcast and loss.
    Compiled, the fp32 logits and their gradient are never stored.

    logits: [tokens, vocab], any float dtype; labels: int64 [tokens], -100 where no loss is
    taken. Returns an fp32 scalar, the sum over the labelled tokens (nats)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


_EAGER: dict[str, Callable[..., Any]] = {
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "swiglu": swiglu,
    "rope": rope,
    "cross_entropy_sum": cross_entropy_sum,
}
_COMPILED: dict[str, Callable[..., Any]] = {}


def compiled(name: str) -> Callable[..., Any]:
    """The compiled function, made on first use; shapes may vary (variable-length batches)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_EAGER[name], dynamic=None)
    return _COMPILED[name]


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = compiled("rms_norm")(hidden_states, self.weight, self.variance_epsilon)
    return out


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    x = autocast_input(x)
    out: torch.Tensor = self.down_proj(compiled("swiglu")(self.gate_proj(x), self.up_proj(x)))
    return out


def _residual_mlp(self: Any, hidden_states: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The decoder layer after attention: the residual add fused into the second norm, then the
    MLP and its residual. [batch, length, hidden] in and out."""
    norm = self.post_attention_layernorm
    hidden_states, normed = compiled("add_rms_norm")(
        hidden_states, attn_out, norm.weight, norm.variance_epsilon
    )
    out: torch.Tensor = hidden_states + self.mlp(normed)
    return out


def _layer_forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_value: Any = None,
    output_attentions: bool = False,
    use_cache: bool = False,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """transformers' decoder layer with the attention residual fused into the second norm."""
    attn_out, weights, present = self.self_attn(
        hidden_states=self.input_layernorm(hidden_states),
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_value=past_key_value,
        output_attentions=output_attentions,
        use_cache=use_cache,
        **kwargs,
    )
    hidden_states = _residual_mlp(self, hidden_states, attn_out)
    return (
        hidden_states,
        *([weights] if output_attentions else []),
        *([present] if use_cache else []),
    )


def _current_layer_forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """_layer_forward for transformers 5.x (the current stack), whose decoder layers take RoPE's
    (cos, sin) as position_embeddings and return the hidden states alone: [batch, length,
    hidden] in, the same shape and dtype out."""
    attn_out, _ = self.self_attn(
        hidden_states=self.input_layernorm(hidden_states),
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    return _residual_mlp(self, hidden_states, attn_out)


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")


def _is_swiglu_mlp(m: nn.Module, config: Any) -> bool:
    return (
        all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))
        and getattr(config, "hidden_act", None) == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
    )


def _is_decoder_layer(m: nn.Module) -> bool:
    parts = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    return all(hasattr(m, a) for a in parts) and _is_rms_norm(
        m.get_submodule("post_attention_layernorm")
    )


def _compile_library_rope(model: PreTrainedModel) -> list[str]:
    """The current stack: transformers 5.x applies RoPE inside its attention modules' forward
    through its modeling module's apply_rotary_pos_emb, looked up at each call, so there it is
    replaced by the same function through torch.compile (one fused kernel instead of eager
    multiplies, a concatenation and adds: 8% of a compiled 1.1B full step on the H200, bench/
    RESULTS.md). Process-wide for that modeling module, as Liger's apply_liger_kernel_to_*
    patches it; the arithmetic is transformers' own. Returns the modules patched."""
    modules = {
        type(m).__module__ for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")
    }
    patched = []
    for module_name in sorted(modules):
        module = sys.modules[module_name]
        library_rope = getattr(module, "apply_rotary_pos_emb", None)
        if library_rope is None:
            continue
        name = f"{module_name}.apply_rotary_pos_emb"
        _EAGER.setdefault(name, library_rope)
        module.apply_rotary_pos_emb = compiled(name)  # type: ignore[attr-defined]
        patched.append(module_name)
    return patched


def compile_blocks(model: PreTrainedModel) -> int:
    """Route every RMSNorm, SwiGLU MLP and decoder layer through the compiled functions, and on
    the current stack transformers' RoPE (_compile_library_rope); returns the number of modules
    changed."""
    layer_forward = _current_layer_forward if stack.is_current() else _layer_forward
    if stack.is_current():
        for module_name in _compile_library_rope(model):
            log.info("torch.compile: %s.apply_rotary_pos_emb (RoPE) compiled", module_name)
    count = 0
    for m in model.modules():
        if _is_decoder_layer(m):
            m.forward = types.MethodType(layer_forward, m)
            count += 1
        elif _is_rms_norm(m):
            m.forward = types.MethodType(_norm_forward, m)
            count += 1
        elif _is_swiglu_mlp(m, model.config):
            m.forward = types.MethodType(_mlp_forward, m)
            count += 1
    log.info("torch.compile: %d layers, norms and MLPs use compiled kernels", count)
    return count
