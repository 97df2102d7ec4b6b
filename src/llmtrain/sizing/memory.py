"""Memory per GPU for a Llama-style decoder, from config.json and the run's shape alone.

Every term is counted the way the stack really allocates it (transformers 4.37.2, peft 0.9.0,
torch AdamW, DeepSpeed 0.14 ZeRO, FSDP through accelerate 0.26); the comments say where a number
comes from. `allocated` is what `torch.cuda.max_memory_allocated` measures; `total` adds what
the caching allocator does not see (CUDA context, NCCL buffers) and a fragmentation margin.

Activation bytes per token per decoder block were read off the tensors autograd saves in
LlamaDecoderLayer with SDPA (tests/unit/test_memory.py measures them again on CPU):
  RMSNorm      fp32 copy of its input (4h) + bf16 normalised input, kept for the weight's grad
               (2h, trainable weight only) + its output, kept by the next Linear (2h)
  attention    q, k, v as SDPA saves them (k and v after repeat_kv, so GQA saves no memory
               here) and SDPA's output, which o_proj keeps as its input (4 x 2h), plus SDPA's
               fp32 log-sum-exp (4 x heads)
  MLP          gate output, SiLU output, up output, their product (4 x 2i)
Eager attention adds the fp32-softmaxed (b, heads, s, s) matrix and its dropout copy.

llmtrain's attention forward (kernels/varlen_attention.py: padding-free packing, or
training.compile on rows without padding) gives SDPA k and v unrepeated on whole rows
(grouped-query heads). On the pinned stack it is the attention module's whole forward: it also
casts the norm output to 16 bits once for q, k and v and gathers RoPE's cos and sin per token
(2 x 2 head_dim). On transformers 5.x it is only the attention function: q, k, v and RoPE are
transformers' own (`RunShape.whole_attention_forward`). With training.compile (kernels/ops.py)
Inductor's functions keep only what their backward cannot recompute (the same CPU test,
compiled):
  RMSNorm      its input (the residual stream, s h) and the fp32 rstd per token: the fp32
               copy, the normalised input and the product are recomputed
  add + norm   the sum (the next residual stream, s h) and its rstd; not the attention output
  SwiGLU       gate and up (2 x 2i): silu(gate) is recomputed; the MLP casts its input once
The chunked loss (kernels/loss.py) holds one chunk's logits at a time (`logits_bytes`); on CUDA
it is Liger's fused linear cross-entropy (`RunShape.liger_loss`), which keeps gradients from its
forward instead (`logits_bytes`, `activation_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, cast

from llmtrain import plan
from llmtrain.errors import ConfigError

GIB = 1024**3
# plan.py's methods and strategies (a test holds them equal), plus inference (generate); one
# process is counted as a DDP world of one (no buckets below two processes).
Method = Literal["inference", "full", "layers", "lora", "qlora"]
Strategy = Literal["ddp", "fsdp", "zero2", "zero3", "zero3_offload"]
METHODS: tuple[Method, ...] = ("inference", *plan.METHODS)
STRATEGIES = cast(tuple[Strategy, ...], tuple(s for s in plan.STRATEGIES if s != "single"))
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DROPOUT_MASK_BYTES = 1  # CUDA native_dropout keeps a bool mask (the CPU kernel a float one)
CUDA_CONTEXT = int(0.75 * GIB)  # CUDA 12 with lazy module loading: 0.5-1 GiB per process
NCCL_BUFFERS = int(0.5 * GIB)  # channels x peers x NCCL_BUFFSIZE (4 MiB), only when world > 1
FRAGMENTATION = 0.10  # caching-allocator slack on top of the allocated peak, stated not measured
# NF4 with double quantisation: 4 bits + 8-bit absmax per 64 values + fp32 per 256 absmaxes.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
LOSS_CHUNK_ELEMENTS = 1 << 27  # kernels/loss.py's CHUNK_ELEMENTS (a test holds them equal)


class NotEstimable(ConfigError):
    """The model is not a dense Llama-style decoder (another layout, or a mixture of experts), so
    its memory cannot be estimated (exit 64 for `estimate`; `validate` reports it and goes on,
    since finetune trains such models)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder (Llama, Mistral, Qwen2, ...) from its config.json."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    torch_dtype: str = "float32"
    model_type: str = "llama"  # which of llmtrain's kernels patch it (sizing/from_config.py)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """The shape from a parsed config.json (a dict, as transformers writes it).

        Raises:
            NotEstimable: a size the estimator needs is missing, the model is a mixture of
                experts, or its attention is not hidden wide (head_dim x heads != hidden): not
                a Llama-style dense decoder as the estimator counts one (exit 64)."""
        experts = _experts(config)
        if experts:
            raise NotEstimable(
                f"config.json of model type {config.get('model_type')!r} is a mixture of experts "
                f"({experts}): the estimator counts a dense Llama-style decoder and does not "
                "cover this architecture (experts, router, the tokens each expert sees)",
                "size it by a short trial run on the target GPU (e.g. training.max_steps=5); the "
                "estimator covers dense Llama-style decoders (llama, mistral, qwen2, gemma)",
            )
        keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
        missing = [k for k in (*keys, "vocab_size") if k not in config]
        if missing:
            raise NotEstimable(
                f"config.json of model type {config.get('model_type')!r} lacks {missing}",
                "the estimator covers Llama-style decoders (llama, mistral, qwen2, gemma)",
            )
        head_dim = config.get("head_dim")
        if head_dim and head_dim * config["num_attention_heads"] != config["hidden_size"]:
            # Qwen3, Gemma-2/3, Mistral-NeMo: q, k, v and the attention output are
            # heads x head_dim wide, not hidden; every attention term here assumes hidden.
            raise NotEstimable(
                f"config.json of model type {config.get('model_type')!r} has head_dim "
                f"{head_dim} x {config['num_attention_heads']} heads != hidden_size "
                f"{config['hidden_size']}: the estimator counts attention as hidden wide and "
                "would give a wrong number",
                "size it by a short trial run on the target GPU (e.g. training.max_steps=5)",
            )
        return cls(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab=config["vocab_size"],
            # LlamaConfig defaults to untied; PretrainedConfig's own default (True) does not apply.
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias") or config.get("model_type") == "qwen2"),
            torch_dtype=str(config.get("torch_dtype") or "float32"),
            model_type=str(config.get("model_type") or "llama"),
        )

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one block."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def block_linear_params(self) -> int:
        bias = self.hidden + 2 * self.kv_dim if self.qkv_bias else 0
        return sum(a * b for a, b in self.linear_dims().values()) + bias

    @property
    def block_params(self) -> int:
        return self.block_linear_params + 2 * self.hidden  # two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """Final norm plus lm_head (nothing extra when lm_head is tied to the embeddings)."""
        return self.hidden + (0 if self.tied_embeddings else self.vocab * self.hidden)

    @property
    def params(self) -> int:
        return self.embedding_params + self.layers * self.block_params + self.head_params

    @property
    def largest_layer_params(self) -> int:
        """Largest single module's own parameters, as DeepSpeed's ZeRO-3 estimator takes it."""
        return max(self.embedding_params, *(a * b for a, b in self.linear_dims().values()))


# config.json keys that count the routed experts of a mixture-of-experts model: Mixtral
# (num_local_experts), Qwen2-MoE, Qwen3-MoE and OLMoE (num_experts), DeepSeek (n_routed_experts).
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _experts(config: dict[str, Any]) -> str | None:
    """'N experts, K per token' when the config describes routed experts, else None."""
    for key in EXPERT_KEYS:
        count = config.get(key)
        if isinstance(count, int) and count > 1:
            per_token = config.get("num_experts_per_tok")
            return f"{key}={count}" + (f", {per_token} per token" if per_token else "")
    return None


@dataclass(frozen=True)
class RunShape:
    """What the run does with the model; defaults are a plain single-GPU LoRA run."""

    method: Method = "lora"
    strategy: Strategy = "ddp"
    micro_batch: int = 1
    seq_len: int = 512
    gpus_per_node: int = 1
    nodes: int = 1
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    dtype_bytes: int = 2  # compute (activations): 2 under bf16/fp16, 4 for fp32 training
    # Stored base weights. finetune trains full/layers weights in fp32 under 16-bit autocast
    # and keeps frozen (LoRA) weights 16-bit with fp32 adapters; None = same as dtype_bytes.
    weight_bytes: int | None = None
    mixed_precision: bool = True  # Trainer's bf16/fp16 flag: torch autocast over the forward
    fused_adam: bool = True  # finetune's default optimizer on CUDA; foreach AdamW otherwise
    lora_r: int = 16
    lora_targets: tuple[str, ...] = LINEARS
    lora_dropout: float = 0.05
    fused_lora: bool = True  # training.fused_lora, where plan.fused_lora_applies
    use_dora: bool = False  # lora.use_dora: a trained magnitude per output feature (method lora)
    # training.param_dtype=bfloat16: 16-bit weights (weight_bytes 2), fp32 master weights, master
    # gradients and Adam moments (plan.master_weights; one process)
    master_weights: bool = False
    # method=layers: which decoder blocks train, and whether embeddings / lm_head train
    trainable_blocks: tuple[int, ...] = ()
    train_embeddings: bool = False
    train_lm_head: bool = False
    attention: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    padded: bool = True  # batches carry padding, so SDPA gets a materialised (b,1,s,s) mask
    # training.compile (kernels/ops.py): each RMSNorm, the SwiGLU MLP, the residual add with the
    # second norm, RoPE and the chunked loss's cross-entropy through torch.compile (Llama-style
    # blocks; Gemma's norms and GELU MLP are not patched, nor modelled apart)
    compiled: bool = False
    # plan.chunked_loss (kernels/loss.py): the loss over chunks of tokens, each chunk's logits
    # made again in backward; False: transformers' loss over the whole logits
    chunked_loss: bool = False
    # The chunked loss runs as Liger's fused linear cross-entropy (kernels/loss.py: on CUDA with
    # liger-kernel, which the image has on Linux x86_64, and a plain lm_head): no chunk inputs
    # kept; from its forward to the backward it keeps the hidden states' gradient and, when
    # lm_head trains, its weight's gradient; one chunk of logits during the forward
    liger_loss: bool = False
    # Which attention forward runs: transformers' (q, k, v each cast their input; SDPA and eager
    # see k, v after repeat_kv), or llmtrain's (kernels/varlen_attention.py, one cast) on "rows"
    # that each hold one sample (SDPA with grouped-query heads: k, v unrepeated in 16 bits,
    # repeated in fp32) or on "packed" padding-free rows (a varlen kernel: flash-attn takes k, v
    # unrepeated; torch's varlen_attn without enable_gqa (torch 2.11) and the per-sample SDPA
    # fallback see them repeated)
    attention_forward: Literal["transformers", "rows", "packed"] = "transformers"
    # llmtrain's attention forward ("rows", "packed") is the attention module's whole forward
    # (pinned stack, varlen_attention._packed_forward): it casts an fp32 norm output to 16 bits
    # once for q, k and v, and gathers RoPE's cos and sin per token in each layer. On
    # transformers 5.x it is only the attention function behind transformers' own module:
    # under autocast q, k and v each cast that input, as in transformers' forward, and cos and
    # sin are the model's, made once per forward and shared by the layers (not counted, as for
    # transformers' forward). from_config.run_shape sets the installed stack's, which
    # finetune runs on; the default is the pinned stack's (the image's).
    whole_attention_forward: bool = True
    # A fused attention kernel takes grouped-query k, v in 16 bits (cuDNN, flash: compute
    # capability 8.0+); before that (V100) whole rows repeat k, v as in fp32.
    grouped_query_kernel: bool = True
    # DPO with full weights: a frozen copy of the base model as the reference, in the compute
    # dtype (LoRA's reference is the same model with the adapter disabled: no copy)
    reference_copy: bool = False
    # DeepSpeed buffers; None = what the HF integration's "auto" resolves to (hidden^2 elements)
    ds_bucket_elements: int | None = None
    # Tokens of the largest packed micro-batch, from the data's measured lengths or the token
    # budget (sizing/tokens.py); None: micro_batch x seq_len
    batch_tokens: int | None = None

    @property
    def wbytes(self) -> int:
        return self.weight_bytes or self.dtype_bytes

    @property
    def autocast(self) -> bool:
        """Trainer's 16-bit autocast over fp32 weights or adapters, as the RunPlan decides it
        (plan.uses_autocast: not under a strategy that computes in 16 bits itself)."""
        fp32_trained = self.wbytes == 4 or self.method in plan.ADAPTER_METHODS
        return plan.uses_autocast(self.mixed_precision, fp32_trained, self.strategy)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def tokens(self) -> int:
        """Tokens of the largest micro-batch: what activations and logits scale with."""
        return self.batch_tokens or self.micro_batch * self.seq_len


@dataclass(frozen=True)
class Breakdown:
    """Bytes per GPU. The first seven terms are allocator-visible; see `allocated`."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # kept for backward (with checkpointing: each block's input)
    recompute: int  # checkpointing: one block's activations, rebuilt after the logits are freed
    logits: int
    buffers: int  # DDP gradient buckets, FSDP/ZeRO-3 gathered layers, ZeRO buckets
    step_temp: int  # optimizer-step temporaries (foreach AdamW's sqrt(exp_avg_sq))
    cuda_context: int
    nccl: int
    # Gradients exist during forward only when held over from earlier micro-batches or
    # preallocated (ZeRO); otherwise they fill in during backward as activations are freed.
    grads_held: bool = False
    host_per_node: int = 0  # CPU memory for offloaded states (ZeRO-3 offload)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def allocated(self) -> int:
        """Peak of the allocator: the start of backward (activations, logits buffers) or the
        optimizer step (gradients and step temporaries), whichever is higher."""
        backward = self.activations + max(self.logits, self.recompute)
        backward += self.gradients if self.grads_held else 0
        step = self.gradients + self.step_temp
        return self.weights + self.optimizer + self.buffers + max(backward, step)

    @property
    def fragmentation(self) -> int:
        return int(FRAGMENTATION * self.allocated)

    @property
    def total(self) -> int:
        return self.allocated + self.fragmentation + self.cuda_context + self.nccl

    def rows(self) -> list[tuple[str, int]]:
        skip = ("grads_held", "host_per_node", "notes")
        names = [f.name for f in fields(self) if f.name not in skip]
        rows = [(n, int(getattr(self, n))) for n in names]
        rows.insert(names.index("step_temp") + 1, ("fragmentation", self.fragmentation))
        return [*rows, ("allocated peak", self.allocated), ("total", self.total)]


@dataclass(frozen=True)
class ModelStates:
    weights: int
    gradients: int
    optimizer: int
    gathered: int = 0  # ZeRO-3 / FSDP: full copies of the layers being computed


def trainable_params(shape: ModelShape, run: RunShape) -> int:
    if run.method == "inference":
        return 0
    if run.method == "full":
        return shape.params
    if run.method == "layers":
        n = len(run.trainable_blocks) * shape.block_params
        n += shape.embedding_params if run.train_embeddings else 0
        return n + (shape.head_params if run.train_lm_head else 0)
    dims = shape.linear_dims()
    per_block = sum(run.lora_r * (dims[t][0] + dims[t][1]) for t in run.lora_targets if t in dims)
    if run.use_dora and run.method == "lora":
        # DoRA's lora_magnitude_vector: one entry per output feature of each adapted layer.
        per_block += sum(dims[t][1] for t in run.lora_targets if t in dims)
    return shape.layers * per_block


def _base_weight_bytes(shape: ModelShape, run: RunShape) -> int:
    """The model's own weights (LoRA adapters apart) in their stored form."""
    if run.method != "qlora":
        return shape.params * run.wbytes
    # Block linears are NF4; prepare_model_for_kbit_training casts everything else to fp32.
    quantised = shape.layers * shape.block_linear_params
    return int(quantised * NF4_BYTES) + (shape.params - quantised) * 4


def model_states(shape: ModelShape, run: RunShape) -> ModelStates:
    """Weights, gradients and optimizer states per GPU."""
    n, nt, g = shape.params, trainable_params(shape, run), run.world
    adapters = run.method in ("lora", "qlora")
    if run.method == "qlora" or run.strategy == "ddp" or run.method == "inference":
        # finetune upcasts adapters to fp32 (16-bit ones without autocast, e.g. on CPU);
        # torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype.
        a = 4 if adapters and run.autocast else run.wbytes
        weights = _base_weight_bytes(shape, run) + (nt * a if adapters else 0)
        if run.master_weights:
            # train/master_weights.py: an fp32 master per trained weight, its fp32 gradient
            # (each micro-batch's 16-bit one is freed into it), fp32 Adam moments on the master.
            return ModelStates(weights + 4 * nt, 4 * nt, 8 * nt)
        return ModelStates(weights, nt * a, 2 * nt * a)
    if adapters:
        n += nt
    if run.strategy == "fsdp":
        return _fsdp_states(shape, run, n, nt)
    # DeepSpeed keeps 16-bit weights plus fp32 master weights, fp32 grads and fp32 Adam
    # moments, as its estimators count them: ZeRO-2 adds partitioned 16-bit grads,
    # 2 + (2 + 4) + (4 + 8) bytes per parameter; ZeRO-3 reduce-scatters straight into the
    # fp32 partition, 2 + 4 + (4 + 8), and gathers the layer being computed.
    if run.strategy == "zero2":
        return ModelStates(2 * n, 6 * nt // g, 12 * nt // g)
    largest = 4 * shape.largest_layer_params
    if run.strategy == "zero3":
        return ModelStates(2 * n // g, 4 * nt // g, 12 * nt // g, largest)
    # zero3_offload: parameters and optimizer on the CPU; the GPU holds the gathered layer.
    return ModelStates(0, 0, 0, largest)


def _fsdp_states(shape: ModelShape, run: RunShape, n: int, nt: int) -> ModelStates:
    """FULL_SHARD with the decoder block as unit: shards plus gathered units.

    The root unit (embeddings, final norm, lm_head) stays gathered from forward to the end of
    backward (FSDP does not reshard the root after forward); one block is gathered and the next
    prefetched. With use_orig_params a flat parameter holding any trainable tensor gets a grad
    for all of it, so LoRA pays gradients for the whole (sharded) model.
    """
    g, w, a = run.world, run.wbytes, run.dtype_bytes
    grads = n * w // g if run.method in ("lora", "layers") else nt * w // g
    root = shape.embedding_params + shape.head_params
    # accelerate's FSDP mixed precision gathers 16-bit copies (and keeps a 16-bit shard).
    gathered = (root + 2 * shape.block_params) * a + (n * a // g if a < w else 0)
    return ModelStates(n * w // g, grads, 2 * nt * w // g, gathered)


def activation_bytes(shape: ModelShape, run: RunShape, *, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward over all blocks and the final norm (logits apart);
    with checkpointing, each block's input (the recomputed block is `recompute_bytes`)."""
    if run.method == "inference":
        return 0
    t, h = run.tokens, shape.hidden
    blocks = [_block_bytes(shape, run, k) for k in range(shape.layers)]
    # Padded batches give SDPA and eager a (b, 1, s, s) mask in the model dtype, shared by blocks.
    dense_mask = run.padded and run.attention != "flash_attention_2"
    mask = 2 * run.micro_batch * run.seq_len**2 if dense_mask else 0
    stream = _stream_bytes(run)
    head_trains = _head_trains(run)
    # The final norm, then what keeps its output: the chunked loss's checkpoint (each chunk's
    # input, whatever trains), or else lm_head's matmul when its weight trains (under autocast
    # its 16-bit cast).
    head = _norm_bytes(run, h, head_trains)
    if run.chunked_loss and run.liger_loss:
        head += run.dtype_bytes * h  # the hidden states' gradient, in the matmul's dtype
    elif run.chunked_loss:
        head += stream * h
    elif head_trains:
        head += (2 if run.autocast else stream) * h
    head *= t
    if checkpointing:
        return shape.layers * stream * h * t + mask + head + _autocast_weight_copies(shape, run, 0)
    return sum(blocks) + mask + head + _autocast_weight_copies(shape, run, shape.layers)


def recompute_bytes(shape: ModelShape, run: RunShape) -> int:
    """Checkpointing: backward rebuilds one block at a time, the largest at most."""
    if run.method == "inference" or not run.gradient_checkpointing:
        return 0
    block = max(_block_bytes(shape, run, k) for k in range(shape.layers))
    return block + _autocast_weight_copies(shape, run, 1) - _autocast_weight_copies(shape, run, 0)


def _stream_bytes(run: RunShape) -> int:
    """dtype of the residual stream: the embeddings' (fp32 in QLoRA after
    prepare_model_for_kbit_training, fp32 for full/layers weights under autocast)."""
    if run.method == "qlora":
        return 4
    return run.wbytes if run.autocast and run.method in ("full", "layers") else run.dtype_bytes


def _norm_bytes(run: RunShape, h: int, trains: bool) -> int:
    """Per token, what one RMSNorm keeps (its output apart: the Linears after it keep that).
    Eager (LlamaRMSNorm): the fp32 copy of its input (the input itself when already fp32) and,
    for a trained weight, the normalised input in the stream's dtype. Compiled (ops.rms_norm,
    ops.add_rms_norm): its input, or the residual sum, in the stream's dtype; the backward
    recomputes the normalised input from it, for the weight's gradient too. Both also keep the
    fp32 rstd per token (4 bytes against 2h or more): not counted."""
    s = _stream_bytes(run)
    return s * h if run.compiled else 4 * h + (s * h if trains else 0)


def _mlp_bytes(shape: ModelShape, run: RunShape, down_keeps: bool) -> int:
    """Per token, the SwiGLU MLP's [intermediate] tensors in the compute dtype: gate and up,
    plus SiLU's output eagerly (the compiled ops.swiglu recomputes it), plus their product
    when down_proj keeps its input (trained weight, or a LoRA target that keeps it)."""
    a, i = run.dtype_bytes, shape.intermediate
    return (2 if run.compiled else 3) * a * i + (a * i if down_keeps else 0)


def _autocast_weight_copies(shape: ModelShape, run: RunShape, blocks: int) -> int:
    """Autocast's 16-bit copies of fp32 linear weights that backward needs: lm_head's and those
    of `blocks` blocks (all without checkpointing, the recomputed one with it); cached for
    trained weights, saved by each matmul for frozen ones where gradient flows."""
    if not run.autocast or run.method not in ("full", "layers"):
        return 0
    if run.method == "layers":
        blocks = min(blocks, shape.layers - min(run.trainable_blocks, default=shape.layers))
    return 2 * (blocks * shape.block_linear_params + shape.embedding_params)


def _attn_bytes(shape: ModelShape, run: RunShape) -> int:
    """Per token: what the attention kernel keeps (q, k, v, output, fp32 log-sum-exp), always
    16-bit under autocast (QLoRA's fp32 q, k, v are cast first). llmtrain's whole forward (the
    pinned stack's) also keeps RoPE's cos and sin, gathered per token (transformers' are per
    position, shared by the batch, on 5.x by the layers too: not counted)."""
    h, kv, a = shape.hidden, shape.kv_dim, run.dtype_bytes
    if run.attention_forward != "transformers":
        # Whole rows in fp32, or on a GPU before Ampere: no grouped-query kernel takes them, k
        # and v are repeated (varlen_attention._sdpa_causal).
        rows_grouped = run.attention_forward == "rows" and a == 2 and run.grouped_query_kernel
        grouped = rows_grouped or run.attention == "flash_attention_2"
        rope = 2 * a * shape.head_dim if run.whole_attention_forward else 0
        return a * (2 * h + 2 * (kv if grouped else h)) + 4 * shape.heads + rope
    if run.attention == "flash_attention_2":
        return a * (2 * h + 2 * kv) + 4 * shape.heads  # flash-attn takes k, v unrepeated
    attn = 4 * a * h + 4 * shape.heads  # SDPA and eager see k, v after repeat_kv
    if run.attention == "eager":
        attn += 2 * 4 * shape.heads * run.seq_len  # fp32 softmax output and its dropout copy
    return attn


def _block_bytes(shape: ModelShape, run: RunShape, index: int) -> int:
    if run.method == "layers" and (not run.trainable_blocks or index < min(run.trainable_blocks)):
        return 0  # below the lowest trainable block no gradient flows: nothing is saved
    trains = run.method == "full" or (run.method == "layers" and index in run.trainable_blocks)
    if run.method == "qlora":
        per_token = _qlora_block(shape, run)
    elif run.autocast:
        per_token = _autocast_block(shape, run, trains)
    else:
        per_token = _plain_block(shape, run, trains)
    return per_token * run.tokens


def _plain_block(shape: ModelShape, run: RunShape, trains: bool) -> int:
    """One dtype throughout (CPU fp32, pure bf16, DeepSpeed's 16-bit module)."""
    h, a = shape.hidden, run.dtype_bytes
    lora = set(run.lora_targets) if run.method == "lora" else set()
    # Inputs that LoRA's lora_A keeps itself; with dropout it keeps the dropped copy instead
    # (counted below), and the frozen base Linear keeps nothing.
    kept = lora if run.lora_dropout == 0 else set()
    # RMSNorm (_norm_bytes), and its output for the Linears.
    norm_attn = _norm_bytes(run, h, trains)
    norm_attn += a * h if trains or kept & {"q_proj", "k_proj", "v_proj"} else 0
    norm_mlp = _norm_bytes(run, h, trains)
    norm_mlp += a * h if trains or kept & {"gate_proj", "up_proj"} else 0
    mlp = _mlp_bytes(shape, run, trains or "down_proj" in kept)
    extra = 0
    for t in lora:  # lora_A's output; with dropout the dropped input and its bool mask
        fan_in = shape.linear_dims()[t][0]
        extra += a * run.lora_r + ((a + DROPOUT_MASK_BYTES) * fan_in if run.lora_dropout > 0 else 0)
    return norm_attn + norm_mlp + _attn_bytes(shape, run) + mlp + extra


def _autocast_block(shape: ModelShape, run: RunShape, trains: bool) -> int:
    """16-bit autocast: each Linear keeps its own 16-bit cast of an fp32 input."""
    h, a = shape.hidden, run.dtype_bytes
    if run.method == "lora":
        # 16-bit stream; base Linears keep nothing (frozen weight). peft casts x to the fp32
        # adapter and autocast back to 16 bits for lora_A, which keeps that copy; without
        # dropout, the fused layer (fused_lora.py, DDP) keeps x itself, once for its readers.
        norms = 2 * _norm_bytes(run, h, False)
        mlp = _mlp_bytes(shape, run, False)
        # DoRA layers keep peft's forward (fused_lora.patch); what DoRA's own extra terms
        # keep for backward is not counted.
        fused = (
            plan.fused_lora_applies(run.fused_lora, run.method, run.strategy)
            and run.lora_dropout == 0
            and not run.use_dora
        )
        lora = _lora_shared_inputs_bytes(shape, run) if fused else _lora_targets_bytes(shape, run)
        return norms + _attn_bytes(shape, run) + mlp + lora
    # fp32 stream: RMSNorm keeps its fp32 input and (trained weight, eager) its normalised
    # input; q, k, v (and gate, up) each keep their own 16-bit cast of its output, except where
    # llmtrain's attention forward (_qkv_casts) and the compiled MLP cast it once for all three
    # (two).
    norms = 2 * _norm_bytes(run, h, trains)
    casts = a * h * (_qkv_casts(run) + (1 if run.compiled else 2)) if trains else 0
    mlp = _mlp_bytes(shape, run, trains)  # down_proj keeps the 16-bit product
    return norms + casts + _attn_bytes(shape, run) + mlp


def _qkv_casts(run: RunShape) -> int:
    """16-bit casts of an fp32 attention-norm output that q, k and v keep, per token (each
    hidden wide): one where llmtrain's attention forward casts it for all three, else one
    per projection."""
    return 1 if run.attention_forward != "transformers" and run.whole_attention_forward else 3


def _lora_targets_bytes(shape: ModelShape, run: RunShape) -> int:
    """Per token, under autocast: lora_A's 16-bit input copy, the dropout mask, lora_A's output."""
    dims, a = shape.linear_dims(), run.dtype_bytes
    total = 0
    for t in run.lora_targets:
        if t in dims:
            fan_in = dims[t][0]
            mask = DROPOUT_MASK_BYTES * fan_in if run.lora_dropout > 0 else 0
            total += a * fan_in + mask + a * run.lora_r
    return total


def _lora_shared_inputs_bytes(shape: ModelShape, run: RunShape) -> int:
    """Per token, LoRA layers that keep their 16-bit input as it is: one copy per input however
    many targets read it (q, k, v the attention norm's output; gate, up the MLP norm's; o_proj
    the attention output, already kept by the kernel), and lora_A's output per target."""
    h, i, a = shape.hidden, shape.intermediate, run.dtype_bytes
    lora = set(run.lora_targets) & set(shape.linear_dims())
    kept = (
        a
        * h
        * (bool(lora & {"q_proj", "k_proj", "v_proj"}) + bool(lora & {"gate_proj", "up_proj"}))
    )
    kept += a * i if "down_proj" in lora else 0
    return kept + a * run.lora_r * len(lora)


def _qlora_block(shape: ModelShape, run: RunShape) -> int:
    """prepare_model_for_kbit_training makes embeddings and norms fp32, so the residual stream
    is fp32: Linear4bit casts its input to 16 bits and keeps it (bitsandbytes MatMul4Bit's
    ctx.tensors) and returns fp32; the MLP's gate, SiLU and up outputs stay fp32. Compiled
    norms and MLP are not modelled here (the 4-bit layers' dtypes then follow autocast_input's
    16-bit input): the eager terms, which keep more, stand for them."""
    h, i, a = shape.hidden, shape.intermediate, run.dtype_bytes
    norms = 2 * 4 * h
    # q, k, v, gate, up cast the fp32 norm output; down the product. llmtrain's attention
    # forward (pinned stack, _qkv_casts) casts once for q, k and v, which keep that one tensor.
    casts = a * ((_qkv_casts(run) + 2) * h + i)
    mlp = 3 * 4 * i
    return norms + casts + _attn_bytes(shape, run) + mlp + _lora_targets_bytes(shape, run)


def loss_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of the chunked loss (kernels/loss.patch_causal_lm_loss)."""
    return max(256, LOSS_CHUNK_ELEMENTS // vocab)


def liger_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk of Liger's fused linear cross-entropy (liger-kernel 0.8.5,
    ops/fused_linear_cross_entropy.py): logits of about tokens x hidden elements at a time."""
    factor = -(-vocab // hidden)
    return min(tokens, 1 << max(0, (-(-tokens // factor) - 1).bit_length()))


def _head_trains(run: RunShape) -> bool:
    return run.method == "full" or (run.method == "layers" and run.train_lm_head)


def logits_bytes(shape: ModelShape, run: RunShape) -> int:
    """LlamaForCausalLM upcasts logits to fp32, copies the shifted slice, and cross entropy
    keeps its fp32 log-softmax: three fp32 (tokens x vocab) tensors live at the loss (the bf16
    logits are freed by then, and backward's gradient buffers replace them one for one).

    The chunked loss holds one chunk's logits at a time, and all of them at the start of
    backward, when every activation is still alive: the chunk's checkpoint makes them again,
    and at the backward of its log-softmax the saved fp32 log-softmax and its incoming and
    outgoing gradients are alive, the same three fp32 tensors over the chunk's tokens. On the
    H200 the chunked loss took 4.50 GiB off fixed-1b-full's peak (bench/results/
    h200-ablation.json, 59.52 to 55.02): 12 bytes per logit of 16384 - 4194 tokens x 32000
    is 4.37 GiB, and the chunk inputs the checkpoint keeps add 0.06 back.

    Compiled (ops.cross_entropy_sum), Inductor's cross-entropy reads the 16-bit logits without
    storing their fp32 upcast or log-softmax, keeps them (and a per-token log-sum-exp) and
    writes their gradient in the logits' dtype: two (chunk x vocab) tensors of the compute
    dtype. On the H200, compiling the cross-entropy alone took 1.00 GiB off fixed-1b-full's
    peak (bench/results/h200-cudnn.json to h200-fused-lora.json): 12 - 4 bytes per logit of a
    4194 x 32000 chunk.

    Liger's fused linear cross-entropy peaks inside its forward, where every activation is
    alive (activation_bytes counts the hidden states' gradient it keeps): the hidden states
    themselves (stream dtype) and their cast to the matmul dtype where that differs, the
    gradient of lm_head's weight when it trains (the weight's dtype: fp32 under autocast,
    accumulated by addmm in fp32), one chunk of logits in the compute dtype (the cross-entropy
    kernel writes their gradient in place), and with fp32 weights under autocast two 16-bit casts
    of the weight: autocast caches the cast of the weight itself (a leaf that requires grad) for
    the input-gradient matmul until the autocast region ends, and casts the view weight.t() of
    the logits matmul afresh for each chunk (measured on the H200 by tests/gpu/
    test_gpu_liger_loss.py: with one cast the estimate was 18% under the peak). Assumed, not
    measured apart: on the H200 the bare-loop fixed-1b-full with bf16 parameters peaked 0.3 GiB
    lower with it than with the compiled chunks (bench/RESULTS.md, 2026-12-01 second session:
    35.0 against 35.3 GiB); these terms give 0.26 GiB lower."""
    if run.method == "inference":
        # generate() prefill: bf16 and fp32 logits for every prompt position.
        return (run.dtype_bytes + 4) * run.tokens * shape.vocab
    if not run.chunked_loss:
        return 3 * 4 * run.tokens * shape.vocab
    if run.liger_loss:
        a, t, h, v = run.dtype_bytes, run.tokens, shape.hidden, shape.vocab
        stream = _stream_bytes(run)
        head_weight = 4 if run.method == "qlora" else run.wbytes
        hidden = stream * t * h + (a * t * h if stream != a else 0)
        grad_weight = head_weight * v * h if _head_trains(run) else 0
        weight_cast = 2 * a * v * h if run.autocast and head_weight != a else 0
        return hidden + grad_weight + a * liger_chunk_tokens(t, v, h) * v + weight_cast
    chunk = min(run.tokens, loss_chunk_tokens(shape.vocab))
    if run.compiled:
        return 2 * run.dtype_bytes * chunk * shape.vocab
    return 3 * 4 * chunk * shape.vocab


def kv_cache_bytes(shape: ModelShape, run: RunShape) -> int:
    return 2 * shape.layers * shape.kv_dim * run.dtype_bytes * run.tokens


def _buffers(shape: ModelShape, run: RunShape, states: ModelStates) -> int:
    if run.strategy == "ddp":
        # DDP buckets hold a second copy of every gradient (gradient_as_bucket_view=False);
        # accelerate wraps in DDP only when there is more than one process.
        return states.gradients if run.world > 1 else 0
    if run.strategy == "fsdp":
        return states.gathered
    bucket = run.ds_bucket_elements or shape.hidden**2
    # overlap_comm double-buffers the 16-bit reduce bucket; ZeRO-3 adds the prefetch bucket.
    ds = 2 * 2 * bucket + (2 * bucket if run.strategy.startswith("zero3") else 0)
    return states.gathered + ds


def _host_bytes(shape: ModelShape, run: RunShape) -> int:
    """ZeRO-3 offload keeps fp32 master, moments and gradients on the CPU (DeepSpeed's own
    estimate for zero_init, with its 1.5 buffer factor)."""
    if run.strategy != "zero3_offload":
        return 0
    return int(trainable_params(shape, run) * 18 / run.nodes * 1.5)


def estimate(shape: ModelShape, run: RunShape) -> Breakdown:
    """Peak memory of one GPU for this run, in bytes, term by term as the module docstring
    derives each (Breakdown.total: the allocated peak plus FRAGMENTATION, the CUDA context and
    NCCL's buffers). Pure arithmetic: no torch, no GPU, nothing raised."""
    nccl = NCCL_BUFFERS if run.world > 1 else 0
    states = model_states(shape, run)
    if run.method == "inference":
        # KV cache for micro_batch x seq_len tokens; one block's gate, up and product at a time.
        return Breakdown(
            weights=states.weights,
            gradients=0,
            optimizer=0,
            activations=kv_cache_bytes(shape, run),
            recompute=0,
            logits=logits_bytes(shape, run),
            buffers=3 * run.dtype_bytes * shape.intermediate * run.tokens,
            step_temp=0,
            cuda_context=CUDA_CONTEXT,
            nccl=nccl,
            notes=("inference: activations = KV cache, buffers = one block's MLP",),
        )
    zero = run.strategy.startswith("zero") and run.method != "qlora"
    # foreach AdamW's sqrt(exp_avg_sq) is one more gradient-sized list; fused AdamW and
    # DeepSpeed's Adam update in place.
    step_temp = 0 if zero or run.fused_adam else states.optimizer // 2
    notes = {
        "fsdp": "fsdp: root unit (embeddings, lm_head) and two blocks gathered",
        "zero3": "zero3: the largest layer gathered (4 bytes/param, DeepSpeed's figure)",
        "zero3_offload": "zero3_offload: 16-bit weights and fp32 states on the CPU",
    }
    reference = shape.params * run.dtype_bytes if run.reference_copy else 0
    return Breakdown(
        weights=states.weights + reference,
        gradients=states.gradients,
        optimizer=states.optimizer,
        activations=activation_bytes(shape, run, checkpointing=run.gradient_checkpointing),
        recompute=recompute_bytes(shape, run),
        logits=logits_bytes(shape, run),
        buffers=_buffers(shape, run, states),
        step_temp=step_temp,
        cuda_context=CUDA_CONTEXT,
        nccl=nccl,
        grads_held=zero or run.gradient_accumulation > 1,
        host_per_node=_host_bytes(shape, run),
        notes=((notes[run.strategy],) if run.strategy in notes else ())
        + (("weights include the DPO reference copy",) if reference else ()),
    )


def fits(shape: ModelShape, run: RunShape, memory_bytes: int) -> bool:
    """estimate's total is at most `memory_bytes` (bytes of one GPU)."""
    return estimate(shape, run).total <= memory_bytes


def largest_micro_batch(shape: ModelShape, run: RunShape, memory_bytes: int) -> int:
    """Largest micro-batch that fits (0 if even 1 does not); memory grows with the batch."""

    def ok(b: int) -> bool:
        # measured tokens grow with the samples in the micro-batch, at their measured mean
        tokens = run.batch_tokens and -(-run.batch_tokens * b // run.micro_batch)
        return fits(shape, replace(run, micro_batch=b, batch_tokens=tokens), memory_bytes)

    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= 1 << 16 and ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"
