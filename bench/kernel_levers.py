"""python -m bench.kernel_levers: what the next speed levers of a full fine-tune would give, each
on and off in one call, on one GPU (issue 21, item 3).

One optimizer step of the bench's fixed-1b-full workload (TinyLlama-1.1B shape, random init, 8
rows of 2048 random tokens, every token with loss) with bf16 parameters and fp32 master weights
(training.param_dtype=bfloat16, llmtrain's fastest full path), timed outside the Trainer so that
only the model's forward and backward differ between the variants:

- `blocks`: llmtrain's training.compile: compiled RMSNorm, SwiGLU, residual-add-norm and RoPE
  as separate graphs, cuDNN-first attention, and llmtrain's own chunked loss with compiled
  cross-entropy (held to the chunks here, where the product now takes Liger's loss on CUDA);
- `layers`: the same arithmetic with each decoder layer compiled as one graph (norms, RoPE,
  attention, MLP and residuals together), the lever "compile of the whole block";
- `layers-hf`: each decoder layer of transformers compiled as one graph, its own SDPA attention;
- `liger`: the pieces of `blocks` replaced by Liger's standalone Triton kernels (RMSNorm,
  SwiGLU, fused add+RMSNorm, fused linear cross-entropy), the lever "use the library where it
  does the same work at equal or better speed";
- `blocks+liger-loss`: `blocks` with only the loss taken from Liger;
- `rows`: `blocks+liger-loss` with attention for rows that each hold one sample (no segment
  search, so no host sync), the reference of the next two;
- `rows+fused-proj`: `rows` with q, k and v computed by one GEMM of the concatenated weights,
  and gate and up by another (larger GEMMs, fewer launches; the weights stay separate);
- `rows+graphs`: `rows` with every decoder layer's forward and backward replayed as CUDA graphs
  (torch.cuda.make_graphed_callables), the lever "CUDA graphs": no launch gaps inside layers;
- `rows+fused-proj+graphs`: both.

Each variant runs in its own process (a fresh torch.compile state), 3 warm-up and 10 timed steps
with a device sync at both ends of the clock; tokens/s, MFU by bench.report's formula, peak
allocated memory and the losses (the same rows and seed: every variant starts from the same
first loss, which shows they compute the same model) go to one JSON.

  python -m bench.kernel_levers --out levers.json [--variants blocks,layers]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from typing import Any

import torch

from bench.report import PEAK_FLOPS
from bench.workloads import MODELS

VARIANTS = (
    "blocks",
    "layers",
    "layers-hf",
    "liger",
    "blocks+liger-loss",
    "rows",
    "rows+fused-proj",
    "rows+graphs",
    "rows+fused-proj+graphs",
)
BATCH, LENGTH, WARMUP, STEPS = 8, 2048, 3, 10


def _rows_attention(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_value: Any = None,
    output_attentions: bool = False,
    use_cache: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None, Any]:
    """llmtrain's attention forward for rows that each hold one sample (no segment search, so
    no host sync inside the compiled layer): [batch, length, hidden] -> the same."""
    from llmtrain.kernels import ops
    from llmtrain.kernels.varlen_attention import _sdpa_rows

    assert position_ids is not None
    bsz, q_len, _ = hidden_states.shape
    tokens = bsz * q_len
    q = self.q_proj(hidden_states).view(tokens, self.num_heads, self.head_dim)
    k = self.k_proj(hidden_states).view(tokens, self.num_key_value_heads, self.head_dim)
    v = self.v_proj(hidden_states).view(tokens, self.num_key_value_heads, self.head_dim)
    cos, sin = self.rotary_emb(v, seq_len=q_len)
    flat_pos = position_ids.expand(bsz, q_len).reshape(-1)
    q, k = ops.rope(q, k, cos[flat_pos][:, None], sin[flat_pos][:, None])
    out = _sdpa_rows(q, k, v, bsz, 0.0)
    return self.o_proj(out.reshape(bsz, q_len, self.hidden_size)), None, past_key_value


def _fused_rows_attention(
    self: Any, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None, **kwargs: Any
) -> tuple[torch.Tensor, None, Any]:
    """_rows_attention with q, k and v from one GEMM of the three weights concatenated."""
    from llmtrain.kernels import ops
    from llmtrain.kernels.varlen_attention import _sdpa_rows

    assert position_ids is not None
    bsz, q_len, _ = hidden_states.shape
    tokens = bsz * q_len
    weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
    qkv = torch.nn.functional.linear(ops.autocast_input(hidden_states), weight)
    kv = self.num_key_value_heads * self.head_dim
    q, k, v = qkv.split((self.num_heads * self.head_dim, kv, kv), dim=-1)
    q = q.reshape(tokens, self.num_heads, self.head_dim)
    k = k.reshape(tokens, self.num_key_value_heads, self.head_dim)
    v = v.reshape(tokens, self.num_key_value_heads, self.head_dim)
    cos, sin = self.rotary_emb(v, seq_len=q_len)
    flat_pos = position_ids.expand(bsz, q_len).reshape(-1)
    q, k = ops.rope(q, k, cos[flat_pos][:, None], sin[flat_pos][:, None])
    out = _sdpa_rows(q, k, v, bsz, 0.0)
    out = self.o_proj(out.reshape(bsz, q_len, self.hidden_size))
    return out, None, kwargs.get("past_key_value")


def _fused_mlp(self: Any, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP with gate and up from one GEMM of the two weights concatenated."""
    from llmtrain.kernels import ops

    weight = torch.cat((self.gate_proj.weight, self.up_proj.weight))
    gate, up = torch.nn.functional.linear(ops.autocast_input(x), weight).chunk(2, dim=-1)
    out: torch.Tensor = self.down_proj(ops.compiled("swiglu")(gate, up))
    return out


class _OneLayer(torch.nn.Module):
    """A decoder layer as make_graphed_callables needs it: one tensor in, one out."""

    def __init__(self, layer: torch.nn.Module, position_ids: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("position_ids", position_ids, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(hidden, position_ids=self.position_ids)[0]
        return out


class _Replayed(torch.nn.Module):
    """The graphed layer where LlamaModel calls its layers (it reads output[0])."""

    def __init__(self, graphed: Any) -> None:
        super().__init__()
        self.graphed = graphed

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        return (self.graphed(hidden_states),)


def _graph_layers(model: Any) -> None:
    """Capture every decoder layer's forward and backward as CUDA graphs (one shared pool)."""
    hidden = model.config.hidden_size
    position_ids = torch.arange(LENGTH, device="cuda")[None]
    layers = tuple(_OneLayer(layer, position_ids) for layer in model.model.layers)
    samples = tuple(
        (
            torch.randn(
                BATCH, LENGTH, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True
            ),
        )
        for _ in layers
    )
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(layers, samples)
    model.model.layers = torch.nn.ModuleList(
        _Replayed(g)
        for g in graphed  # type: ignore[arg-type]
    )


def _liger_pieces() -> None:
    """Put Liger's kernels where llmtrain's compiled pieces are looked up (ops.compiled)."""
    from liger_kernel import functional as liger

    from llmtrain.kernels import ops

    def add_rms_norm(
        hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, summed = liger.fused_add_rms_norm(hidden, residual, weight, eps)
        return summed, normed

    ops._COMPILED["rms_norm"] = lambda x, w, eps: liger.rms_norm(x, w, eps)
    ops._COMPILED["swiglu"] = lambda gate, up: liger.swiglu(gate, up)
    ops._COMPILED["add_rms_norm"] = add_rms_norm


def _liger_loss(model: Any) -> None:
    """The causal-LM loss by Liger's fused linear cross-entropy (mean over label tokens)."""
    from liger_kernel import functional as liger
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> Any:
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        targets = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100).reshape(-1)
        flat = hidden.reshape(-1, hidden.shape[-1])
        loss = liger.fused_linear_cross_entropy(flat, model.lm_head.weight, targets)[0]
        return CausalLMOutputWithPast(loss=loss)

    model.forward = forward


def build(variant: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmtrain.kernels import loss as fused_loss
    from llmtrain.kernels import ops, varlen_attention

    torch.manual_seed(0)
    config = LlamaConfig(**MODELS["1b"], max_position_embeddings=LENGTH, use_cache=False)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).train()
    if variant == "layers-hf":
        for layer in model.model.layers:
            layer.compile()
        _chunks_only(fused_loss)
        fused_loss.patch_causal_lm_loss(model, compiled=True)
        return model
    if variant == "layers":  # eager pieces inside, one graph per layer around them
        for name, fn in ops._EAGER.items():
            ops._COMPILED[name] = fn
        for m in varlen_attention._attention_modules(model):
            m.forward = types.MethodType(_rows_attention, m)
        ops.compile_blocks(model)
        for layer in model.model.layers:
            layer.compile()
        _chunks_only(fused_loss)
        fused_loss.patch_causal_lm_loss(model, compiled=True)
        return model
    if variant.startswith("rows"):
        fused = "fused-proj" in variant
        for m in varlen_attention._attention_modules(model):
            m.forward = types.MethodType(_fused_rows_attention if fused else _rows_attention, m)
        ops.compile_blocks(model)
        if fused:
            for layer in model.model.layers:
                layer.mlp.forward = types.MethodType(_fused_mlp, layer.mlp)
        _liger_loss(model)
        if "graphs" in variant:
            _graph_layers(model)
        return model
    if variant == "liger":
        _liger_pieces()
    varlen_attention.patch_attention(model, compiled_rope=True)
    ops.compile_blocks(model)
    if variant in ("liger", "blocks+liger-loss"):
        _liger_loss(model)
    else:
        _chunks_only(fused_loss)
        fused_loss.patch_causal_lm_loss(model, compiled=True)
    return model


def _chunks_only(fused_loss: Any) -> None:
    """The product's loss without its Liger path (lm_loss asks liger_loss_function first)."""
    fused_loss.liger_loss_function = lambda: (None, "bench.kernel_levers: llmtrain's chunks")


def run_one(variant: str) -> dict[str, Any]:
    from llmtrain.train.master_weights import MasterWeights

    model = build(variant)
    masters = MasterWeights(max_grad_norm=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    masters.attach(optimizer)
    g = torch.Generator().manual_seed(0)
    vocab = MODELS["1b"]["vocab_size"]
    batches = [
        torch.randint(3, vocab, (BATCH, LENGTH), generator=g).cuda() for _ in range(WARMUP + STEPS)
    ]
    losses: list[torch.Tensor] = []
    start = 0.0
    torch.cuda.reset_peak_memory_stats()
    for i, ids in enumerate(batches):
        if i == WARMUP:
            torch.cuda.synchronize()
            start = time.perf_counter()
        # graphed layers replay what was captured; autocast's weight cache cannot be captured
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled="graphs" not in variant):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        masters.accumulate()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    shape = MODELS["1b"]
    params = sum(p.numel() for p in model.parameters())
    tokens = BATCH * LENGTH * STEPS
    flops = 6 * params * tokens + 6 * shape["num_hidden_layers"] * shape["hidden_size"] * (
        BATCH * STEPS * LENGTH**2
    )
    return {
        "variant": variant,
        "tokens_per_s": tokens / seconds,
        "step_ms": 1000 * seconds / STEPS,
        "mfu": flops / seconds / PEAK_FLOPS,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses": [float(x) for x in losses],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", help="write every variant's result here as JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this variant
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one)), flush=True)
        return 0
    results = []
    for variant in args.variants.split(","):
        child = subprocess.run(
            [sys.executable, "-m", "bench.kernel_levers", "--one", variant],
            capture_output=True,
            text=True,
        )
        lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
        if child.returncode or not lines:
            results.append({"variant": variant, "error": child.stderr[-3000:]})
        else:
            results.append(json.loads(lines[-1][len("RESULT ") :]))
        r = results[-1]
        print(
            f"{variant:20s} "
            + (
                f"{r['tokens_per_s']:9.0f} tok/s  MFU {r['mfu']:.1%}  {r['peak_gib']:.1f} GiB  "
                f"first loss {r['losses'][0]:.4f}"
                if "error" not in r
                else "ERROR " + r["error"].strip().splitlines()[-1]
            ),
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": BATCH, "length": LENGTH, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
