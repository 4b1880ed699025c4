"""Hugging Face folders of `LlamaForCausalLM`: `config.json` plus `model.safetensors`, or
`model-0000k-of-0000N.safetensors` listed in `model.safetensors.index.json`.

Weights are read as Meta's names and layout, one model-parallel rank's slices at a time, straight
from the memory-mapped files (safetensors slicing): a rank never holds more than its share.
Hugging Face's conversion permuted the rows of q and k within each head so that rotary
embedding rotates the halves of a head (`rotate_half`); Meta's code rotates consecutive pairs.
`unpermute_rows` puts Meta's order back, so the same model gives the same logits.
"""

import json
import os
from typing import Dict, Optional, Tuple

import torch

from ..errors import UserError
from .model import LLAMA3_SCALING, ModelArgs
from .params import (BOOL, LIST, OBJECT, POSITIVE, POSITIVE_INT, TOKEN_IDS, check_fields, check_rope_scaling,
                     check_token_ids)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Meta's name -> Hugging Face's ("{i}" is the layer).
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def hf_name(meta_name: str) -> str:
    if meta_name in TOP_NAMES:
        return TOP_NAMES[meta_name]
    _, i, rest = meta_name.split(".", 2)
    return f"model.layers.{i}.{LAYER_NAMES[rest]}"


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config


def rope_settings(config: dict, path: str) -> Tuple[float, Optional[dict]]:
    """rope_theta and the llama3 scaling (or None). Hub files have top-level `rope_theta` and
    `rope_scaling`; transformers 5 writes both inside `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if not scaling:
        return float(theta), None
    if not POSITIVE[0](theta):
        raise UserError(f"{path}: rope_theta is {theta!r}: it should be {POSITIVE[1]}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UserError(f"{path}: rope_scaling of type {kind!r} is not supported (only llama3 and none)")
    return float(theta), check_rope_scaling(scaling, LLAMA3_SCALING, path)


# What config.json says that we use.
HF_FIELDS = {
    "hidden_size": (POSITIVE_INT, True), "num_hidden_layers": (POSITIVE_INT, True),
    "num_attention_heads": (POSITIVE_INT, True), "intermediate_size": (POSITIVE_INT, True),
    "vocab_size": (POSITIVE_INT, True), "num_key_value_heads": (POSITIVE_INT, False), "head_dim": (POSITIVE_INT, False),
    "rms_norm_eps": (POSITIVE, False), "rope_theta": (POSITIVE, False), "max_position_embeddings": (POSITIVE_INT, False),
    "tie_word_embeddings": (BOOL, False), "bos_token_id": (TOKEN_IDS, False), "eos_token_id": (TOKEN_IDS, False),
    "rope_scaling": (OBJECT, False), "rope_parameters": (OBJECT, False), "architectures": (LIST, False),
}


def check_supported(config: dict, path: str) -> None:
    check_fields(config, {"architectures": HF_FIELDS["architectures"]}, path)
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        what = archs[0] if archs else config.get("model_type")
        raise UserError(f"{path}: architecture {what!r} is not LlamaForCausalLM: only LLaMA checkpoints load")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UserError(f"{path}: {key} is true: LLaMA has no biases, this model is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act {config['hidden_act']!r} is not LLaMA's silu")
    if config.get("quantization_config") is not None:  # e.g. bitsandbytes int8 weights with their SCB scales
        method = config["quantization_config"].get("quant_method", "?") if isinstance(config["quantization_config"], dict) else "?"
        raise UserError(f"{path}: the weights are quantized ({method}, quantization_config): only fp32, fp16 and bf16 "
                        f"safetensors are read; use the unquantized checkpoint")
    check_fields(config, HF_FIELDS, path)
    check_token_ids(config, ("bos_token_id", "eos_token_id"), config["vocab_size"], path)


def model_args(config: dict, path: str) -> ModelArgs:
    """ModelArgs of a `LlamaForCausalLM` config.json (one-line errors for what we do not run)."""
    check_supported(config, path)
    theta, scaling = rope_settings(config, path)
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") is not None and config["head_dim"] * heads != dim:
        raise UserError(f"{path}: head_dim {config.get('head_dim')} is not hidden_size / num_attention_heads: not supported")
    return ModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads, vocab_size=config["vocab_size"],
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        intermediate_size=config["intermediate_size"], embedding_split="vocab",
    )


def weight_files(folder: str) -> Dict[str, str]:
    """Tensor name -> the safetensors file holding it."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a safetensors index with a weight_map ({type(e).__name__})") from None
        files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise UserError(f"{file} is named in {index} but missing: download every model-0000k-of-0000N.safetensors")
        return files
    single = os.path.join(folder, SINGLE_FILE)
    if not os.path.isfile(single):
        raise UserError(f"{folder} has config.json but neither {SINGLE_FILE} nor {INDEX_FILE}: "
                        f"download the safetensors weights (pytorch_model.bin files are not read)")
    from safetensors import safe_open

    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type on a truncated or corrupt file
        raise UserError(f"cannot read {single} as safetensors ({str(e).splitlines()[0][:200]}): download it again") from None


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's q/k rows (per head: the first halves of the rotary pairs, then the second
    halves) back to Meta's (pairs adjacent). w: (heads * head_dim, in)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `unpermute_rows` (Meta's order to Hugging Face's)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_layout(state_dict: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """A full Meta-layout state dict in Hugging Face's names and q/k row order (the benchmark's
    transformers model and the stand-in folders are made with it)."""
    out = {}
    for name, t in state_dict.items():
        leaf = name.split(".")[-2]
        if leaf in ("wq", "wk"):
            t = permute_rows(t, args.n_heads if leaf == "wq" else args.kv_heads)
        out[hf_name(name)] = t
    return out
