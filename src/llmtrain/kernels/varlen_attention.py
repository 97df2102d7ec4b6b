"""Padding-free packing: each micro-batch of instruction samples becomes one row, no padding.

Positions restart at every sample and the label of each sample's first token is dropped (in the
row it would be predicted from the previous sample), so the HF loss, the mean over the batch's
label tokens, is the padded batch's loss. Attention must then keep samples apart: each Llama-style
attention module gets a forward that finds the samples from where `position_ids` restart and
calls a variable-length kernel, one of (in order of preference):

- `flash_attn`: flash-attn's `flash_attn_varlen_func` (the image has flash-attn);
- `torch_varlen`: torch's own varlen flash kernel, `torch.nn.attention.varlen` (CUDA, recent torch);
- `sdpa_per_sample`: `scaled_dot_product_attention` once per sample (anywhere, slower).

None of them ever attends across samples. The same forward serves unpacked rows without padding
(every row is then one sample): those go to `scaled_dot_product_attention` with cuDNN's fused
attention first where torch can rank its backends (on an H200 1.6-1.8x faster forward and
backward than the flash kernel, bench/attention.py), falling back per call to flash. A batch that
carries an attention mask takes the original forward.

That forward is 4.37.2's (the pinned stack). transformers 5.x (the current stack) computes RoPE
once per model and dispatches attention through its registries, so there the same kernels are
registered as an attention function (varlen_attention_forward) with a mask function that builds
no mask over a packed row (varlen_attention_mask), and the model is switched to them.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from llmtrain import stack
from llmtrain.errors import ConfigError
from llmtrain.kernels import ops as fused_ops
from llmtrain.labels import IGNORE_INDEX

log = logging.getLogger(__name__)

# Attention classes of transformers 4.37.2 whose layout (q/k/v/o_proj, rotary_emb, heads,
# rotate-half RoPE) the packed forward reproduces; on transformers 5.x the same families, whose
# attention modules hand plain causal attention (no soft cap) to the registry's function.
SUPPORTED = ("llama", "mistral")


@dataclass
class PackingCollator:
    """Concatenates the micro-batch into one row with restarting positions and no padding.

    features: tokenized samples, each with `input_ids` and `labels` (int lists of one length).
    Returns int64 tensors of shape [1, total tokens]: `input_ids`; `labels`, with each sample's
    first label -100 (in the row it would be predicted from the previous sample); and
    `position_ids`, 0, 1, ... restarting at each sample."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.append(torch.as_tensor(f["input_ids"], dtype=torch.long))
            lab = torch.as_tensor(f["labels"], dtype=torch.long).clone()
            lab[0] = IGNORE_INDEX
            labels.append(lab)
            positions.append(torch.arange(n, dtype=torch.long))
        return {
            "input_ids": torch.cat(ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None],
        }


@dataclass(frozen=True)
class Segments:
    """The samples of a flattened batch of T tokens holding S samples: cu_seqlens [S + 1]
    int32 on the device (sample i is tokens cu_seqlens[i]:cu_seqlens[i+1]), lengths (S ints,
    tokens) and max_len (tokens, the longest)."""

    cu_seqlens: torch.Tensor
    lengths: list[int]
    max_len: int


class _SegmentCache:
    """All layers of one forward (and their checkpoint recomputation) share one position_ids
    tensor: find its samples once, with one host sync, not once per layer."""

    def __init__(self) -> None:
        self.key: tuple[torch.Tensor, int] | None = None
        self.value: Segments | None = None

    def get(self, position_ids: torch.Tensor, batch: int, length: int) -> Segments:
        if self.key is not None and self.key[0] is position_ids and self.key[1] == batch:
            assert self.value is not None
            return self.value
        self.value = find_segments(position_ids, batch, length)
        self.key = (position_ids, batch)
        return self.value


_segment_cache = _SegmentCache()


@functools.lru_cache(maxsize=16)
def whole_rows(batch: int, length: int, device: torch.device) -> Segments:
    """The segments of `batch` rows of `length` tokens that are one sample each (data.packing
    none: the rows never restart their positions), without reading position_ids: no host
    sync. cu_seqlens is made on the device once per shape."""
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return Segments(cu_seqlens=cu, lengths=[length] * batch, max_len=length)


def _segments(module: Any, position_ids: torch.Tensor, batch: int, length: int) -> Segments:
    if getattr(module, "_llmtrain_rows_are_samples", False):
        return whole_rows(batch, length, position_ids.device)
    return _segment_cache.get(position_ids, batch, length)


def find_segments(position_ids: torch.Tensor, batch: int, length: int) -> Segments:
    """The samples of a flattened batch: one starts where the position is 0 and at every row
    start.

    position_ids: int64 [1 or batch, length] (broadcast over the batch), restarting at 0 at
    each sample, as PackingCollator makes them. Returns cu_seqlens, int32 [samples + 1] on
    position_ids' device: the offsets of the samples in the batch * length flattened tokens
    (flash-attn's varlen layout), with their lengths and the longest in tokens. Reading the
    lengths is one host sync."""
    pos = position_ids.expand(batch, length).reshape(-1)
    start = pos == 0
    start[::length] = True
    offsets = start.nonzero().flatten()
    total = torch.tensor([batch * length], device=pos.device)
    cu = torch.cat([offsets, total]).to(torch.int32)
    lengths = cu.diff().tolist()
    return Segments(cu_seqlens=cu, lengths=lengths, max_len=max(lengths))


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[tokens, kv_heads, dim] -> [tokens, kv_heads * groups, dim], as transformers' repeat_kv."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sdpa_per_sample(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, dropout: float
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
    outs = []
    for qs, ks, vs in zip(
        q.split(seg.lengths), k.split(seg.lengths), v.split(seg.lengths), strict=True
    ):
        out = F.scaled_dot_product_attention(
            qs.transpose(0, 1),
            ks.transpose(0, 1),
            vs.transpose(0, 1),
            dropout_p=dropout,
            is_causal=True,
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def _flash_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, dropout: float
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    out: torch.Tensor = flash_attn_varlen_func(
        q,
        k,
        v,
        seg.cu_seqlens,
        seg.cu_seqlens,
        seg.max_len,
        seg.max_len,
        dropout_p=dropout,
        causal=True,
    )
    return out


def _torch_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, dropout: float
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    # The signature moved between torch releases: causal was `is_causal`, then a window.
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = (
        {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    )
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:
        groups = q.shape[1] // k.shape[1]
        k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
    out = varlen_attn(q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, **kwargs)
    assert isinstance(out, torch.Tensor)  # no auxiliary outputs were asked for
    return out


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal attention over whole rows, cuDNN attention ranked first: q [batch, heads, len,
    dim], k and v [batch, kv_heads, len, dim] -> [batch, heads, len, dim].

    cuDNN and flash attention take grouped-query heads but only 16-bit inputs on an sm80+ GPU;
    elsewhere (fp32, or fp16 on a V100) k and v are repeated to every query head, as
    transformers' repeat_kv does, for the memory-efficient kernel: it takes no grouped heads,
    and the math kernel that would would keep the whole [batch, heads, len, len] fp32 score
    matrix for backward. The math kernel stays last, for what no fused kernel takes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _fused_kernels_take(q):
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]
        )


def _fused_kernels_take(q: torch.Tensor) -> bool:
    """Whether cuDNN or flash attention can take `q` (and its grouped k, v): 16-bit, on a GPU of
    compute capability 8.0 (A100) or newer."""
    return q.dtype in (torch.float16, torch.bfloat16) and _capability(q.device) >= (8, 0)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def _sdpa_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bsz: int, dropout: float
) -> torch.Tensor:
    """Rows that each hold one whole sample: [tokens, heads, dim] -> [bsz, heads, len, dim]
    views, cuDNN attention ranked first."""
    q, k, v = (x.view(bsz, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    out = _sdpa_causal(q, k, v, dropout)
    batch, heads, length, dim = out.shape
    return out.transpose(1, 2).reshape(batch * length, heads, dim)


def ranks_backends() -> bool:
    """torch 2.6+: sdpa_kernel takes a priority order (and SDPA grouped-query heads, 2.5+).
    scaled_dot_product_attention itself is a builtin without a signature to inspect."""
    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters


@functools.cache
def ranked_sdpa(device: torch.device) -> bool:
    """Whether whole rows take _sdpa_rows: CUDA, and a torch that ranks SDPA backends."""
    ranked = device.type == "cuda" and ranks_backends()
    log.info("whole-row attention: %s", "sdpa, cuDNN first" if ranked else "the packed kernel")
    return ranked


_KERNEL_FUNCS: dict[str, Callable[..., torch.Tensor]] = {
    "flash_attn": _flash_attn,
    "torch_varlen": _torch_varlen,
    "sdpa_per_sample": _sdpa_per_sample,
}


def _probe(kernel: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the kernel forward and backward on two tiny samples; the error text if it fails."""
    try:
        with torch.enable_grad():  # the first use may come under no_grad (evaluation)
            q, k, v = (
                torch.randn(24, h, 64, device=device, dtype=dtype, requires_grad=True)
                for h in (4, 2, 2)
            )
            pos = torch.tensor([list(range(16)) + list(range(8))], device=device)
            _KERNEL_FUNCS[kernel](q, k, v, find_segments(pos, 1, 24), 0.0).sum().backward()
    except Exception as exc:  # any failure means: use the next kernel
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


@functools.cache
def choose_kernel(device: torch.device, dtype: torch.dtype, dropout: float) -> str:
    """The first kernel that runs forward and backward here, chosen at first use and logged."""
    candidates = []
    # Both flash kernels need compute capability 8.0: a V100 or T4 goes straight to SDPA
    # rather than failing two probes (and warning) on every run.
    if device.type == "cuda" and _capability(device) >= (8, 0):
        if importlib.util.find_spec("flash_attn") is not None:
            candidates.append("flash_attn")
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None and dropout == 0:
            candidates.append("torch_varlen")  # its dropout is fixed at 0
    for kernel in candidates:
        error = _probe(kernel, device, dtype)
        if error is None:
            break
        log.warning("padding-free attention: %s does not run here (%s)", kernel, error)
    else:
        kernel = "sdpa_per_sample"
    log.info("padding-free attention: kernel %s (%s, %s)", kernel, device, dtype)
    return kernel


def _check_window(seg: Segments, window: int | None) -> None:
    """The kernels attend to a whole sample: refuse one longer than a sliding window.

    Raises:
        ConfigError: a sample is longer than `window` (tokens) (exit 64)."""
    if window is not None and seg.max_len > window:
        raise ConfigError(
            f"a sample of {seg.max_len} tokens is longer than the model's sliding window "
            f"({window}), which padding-free attention does not apply",
            f"set data.max_length to at most {window}, or data.packing=none",
        )


def _packed_forward(
    self: Any,  # an attention module of transformers, with the attributes patch_attention sets
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_value: Any = None,
    output_attentions: bool = False,
    use_cache: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None, Any]:
    """LlamaAttention.forward (transformers 4.37.2) for rows of packed samples.

    hidden_states: [batch, length, hidden] in the model's dtype (or fp32 under autocast);
    position_ids: int64 [1 or batch, length], restarting at 0 at each sample. Returns
    (attention output [batch, length, hidden], None, past_key_value) as the original does.
    With an attention mask, cached keys, attention weights asked for, or no position_ids, the
    original forward runs instead.

    Raises:
        ConfigError: a sample is longer than the model's sliding window (exit 64)."""
    cached = past_key_value is not None and past_key_value.get_seq_length(self.layer_idx) > 0
    if attention_mask is not None or output_attentions or cached or position_ids is None:
        return self._llmtrain_original_forward(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
            **kwargs,
        )
    bsz, q_len, _ = hidden_states.shape
    seg = _segments(self, position_ids, bsz, q_len)
    _check_window(seg, getattr(self.config, "sliding_window", None))
    tokens = bsz * q_len
    hidden_states = fused_ops.autocast_input(hidden_states)
    q = self.q_proj(hidden_states).view(tokens, self.num_heads, self.head_dim)
    k = self.k_proj(hidden_states).view(tokens, self.num_key_value_heads, self.head_dim)
    v = self.v_proj(hidden_states).view(tokens, self.num_key_value_heads, self.head_dim)
    cos, sin = self.rotary_emb(v, seq_len=seg.max_len)
    flat_pos = position_ids.expand(bsz, q_len).reshape(-1)
    q, k = self._llmtrain_rope(q, k, cos[flat_pos][:, None], sin[flat_pos][:, None])
    dropout = self.attention_dropout if self.training else 0.0
    if len(seg.lengths) == bsz and ranked_sdpa(q.device):  # every row is one sample
        out = _sdpa_rows(q, k, v, bsz, dropout)
    else:
        # Chosen where the tensors are: the Trainer moves the model after it was patched.
        self._llmtrain_kernel = choose_kernel(q.device, q.dtype, self.attention_dropout)
        out = _KERNEL_FUNCS[self._llmtrain_kernel](q, k, v, seg, dropout)
    return self.o_proj(out.reshape(bsz, q_len, self.hidden_size)), None, past_key_value


def varlen_attention_forward(
    module: Any,  # an attention module of transformers 5.x (layer_idx, is_causal, config)
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """llmtrain's attention function in transformers 5.x's AttentionInterface (the current
    stack), with the contract of its `sdpa_attention_forward` (integrations/sdpa_attention.py).

    query: [batch, heads, length, head_dim]; key, value: [batch, kv_heads, kv_length, head_dim],
    RoPE applied (the model's dtype, or mixed under autocast); dropout: probability; scaling: the
    softmax scale (None: 1/sqrt(head_dim)); sliding_window: this layer's window in tokens;
    position_ids: int64 [1 or batch, length], restarting at 0 at each sample. Returns
    (output [batch, length, heads, head_dim], None). Rows of one sample each take cuDNN-first
    SDPA on a GPU, packed rows the varlen kernel choose_kernel picks. With an attention mask,
    cached keys (kv_length != length), no position_ids, a soft cap, attention weights asked for
    or a non-causal module, transformers' sdpa_attention_forward runs instead (it refuses a
    soft cap with ValueError).

    Raises:
        ConfigError: a sample is longer than the layer's sliding window (exit 64)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    is_causal = kwargs.get("is_causal")
    if (
        attention_mask is not None
        or position_ids is None
        or key.shape[2] != length
        or softcap is not None
        or kwargs.get("output_attentions", False)
        or not (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    ):
        out: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            softcap=softcap,
            position_ids=position_ids,
            **kwargs,
        )
        return out
    seg = _segments(module, position_ids, batch, length)
    _check_window(seg, sliding_window)
    if scaling is not None and scaling != dim**-0.5:  # every kernel scales by 1/sqrt(head_dim)
        query = query * (scaling * dim**0.5)
    # Under autocast RoPE's fp32 cos/sin promote q and k but not v; the kernels take one dtype,
    # autocast's (as transformers' flash_attention_forward casts to it).
    target = fused_ops.autocast_dtype(query.device.type)
    if target is not None:
        query, key, value = (x.to(target) for x in (query, key, value))
    if len(seg.lengths) == batch and ranked_sdpa(query.device):  # every row is one sample
        rows = _sdpa_causal(query, key, value, dropout)
        return rows.transpose(1, 2).contiguous(), None
    q, k, v = (
        x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value)
    )
    # Chosen where the tensors are: the Trainer moves the model after it was switched.
    module._llmtrain_kernel = choose_kernel(
        q.device, q.dtype, getattr(module, "attention_dropout", 0.0)
    )
    packed = _KERNEL_FUNCS[module._llmtrain_kernel](q, k, v, seg, dropout)
    return packed.view(batch, length, heads, dim), None


def varlen_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """llmtrain's entry in transformers 5.x's AttentionMaskInterface, with the signature of
    its `sdpa_mask` (masking_utils.py).

    No mask (None) for rows without padding or cached keys (attention_mask None, kv_length ==
    q_length): varlen_attention_forward keeps the samples apart from position_ids, where
    sdpa_mask would build a dense boolean [batch, 1, q_length, kv_length] block mask over the
    packed row. Otherwise sdpa_mask's mask, which the SDPA fallback reads."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kv_length == q_length and kv_offset == 0:
        return None
    mask: torch.Tensor | None = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )
    return mask


# The name of llmtrain's attention in transformers 5.x's attention and mask registries.
ATTENTION_NAME = "llmtrain_varlen"


def _use_registered_attention(model: PreTrainedModel) -> None:
    """The current stack: register varlen_attention_forward and varlen_attention_mask under
    ATTENTION_NAME and switch the model to it (transformers' set_attn_implementation).

    Raises:
        ConfigError: the model does not dispatch attention through the registry (exit 64)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, varlen_attention_mask)
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:  # set_attn_implementation only warns
        raise ConfigError(
            f"data.packing=padding_free: {type(model).__name__} does not take its attention "
            "from transformers' AttentionInterface",
            "set data.packing=none",
        )
    modules = [
        m for m in model.modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj"))
    ]
    log.info(
        "padding-free attention on %d attention modules (attn_implementation %s)",
        len(modules),
        ATTENTION_NAME,
    )


def _attention_modules(model: nn.Module) -> list[Any]:
    return [
        m
        for m in model.modules()
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "rotary_emb"))
    ]


def supports(model: PreTrainedModel) -> bool:
    """Whether patch_attention can patch this model: a SUPPORTED type, non-eager attention."""
    return model.config.model_type in SUPPORTED and model.config._attn_implementation != "eager"


def patch_attention(
    model: PreTrainedModel, *, compiled_rope: bool = False, packed: bool = True
) -> None:
    """Padding-free attention for `model`. On the pinned stack every attention module gets the
    packed forward (_packed_forward; `compiled_rope`: its RoPE through torch.compile). On the
    current stack the model's attn_implementation becomes ATTENTION_NAME, llmtrain's entry in
    transformers' attention and mask registries (varlen_attention_forward; RoPE, applied by
    transformers before the function, is compiled by ops.compile_blocks); masked or cached calls
    take transformers' SDPA path, also for a model loaded with flash_attention_2 (transformers'
    flash path looks its kernel up by the config's implementation name).

    `packed`: rows may hold several samples (restarting position_ids, found with one host sync
    per forward). False (data.packing none, where training.compile still takes this attention
    for cuDNN's whole-row kernel): every unmasked row is one sample, taken as such without
    reading its positions.

    Raises:
        ConfigError: the model type is not one of SUPPORTED, its attention is eager, or it
            does not dispatch through transformers' registry (exit 64)."""
    config = model.config
    if config.model_type not in SUPPORTED:
        raise ConfigError(
            f"data.packing=padding_free supports {', '.join(SUPPORTED)} models, "
            f"not {config.model_type}",
            "set data.packing=none",
        )
    if config._attn_implementation == "eager":
        raise ConfigError(
            "data.packing=padding_free needs model.attn_implementation sdpa or "
            "flash_attention_2 (eager attention builds a mask over the whole row)",
            "set model.attn_implementation=auto",
        )
    for m in model.modules():
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            m._llmtrain_rows_are_samples = not packed
    if stack.is_current():
        _use_registered_attention(model)
        return
    modules = _attention_modules(model)
    rope = fused_ops.compiled("rope") if compiled_rope else fused_ops.rope
    for m in modules:
        m._llmtrain_original_forward = m.forward
        m._llmtrain_rope = rope
        m.forward = types.MethodType(_packed_forward, m)
    log.info(
        "padding-free attention on %d attention modules%s",
        len(modules),
        " (compiled RoPE)" if compiled_rope else "",
    )
