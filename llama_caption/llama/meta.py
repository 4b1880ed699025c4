"""Meta's checkpoint layout: `params.json` and one `consolidated.XX.pth` per model-parallel rank,
each weight split along the dimension `model.shard_dim` names (the token embedding on its width
for Llama 1/2, on the vocabulary for Llama 3). Reading is memory-mapped and weights-only."""

import glob
import json
import os
from typing import Dict, List, Tuple

import torch

from ..errors import UserError
from .model import LLAMA3_SCALING, ModelArgs, shard_dim
from .params import BOOL, POSITIVE, POSITIVE_INT, VOCAB, check_fields, check_rope_scaling

IGNORED_KEYS = ("rope.freqs",)  # a buffer Meta saved by accident in v1; it is recomputed

# What params.json says that we use (Llama 1, 2, 3.x; our converted folders add rope_scaling).
META_FIELDS = {
    "dim": (POSITIVE_INT, True), "n_layers": (POSITIVE_INT, True), "n_heads": (POSITIVE_INT, True),
    "n_kv_heads": (POSITIVE_INT, False), "vocab_size": (VOCAB, False), "multiple_of": (POSITIVE_INT, False),
    "ffn_dim_multiplier": (POSITIVE, False), "norm_eps": (POSITIVE, False), "rope_theta": (POSITIVE, False),
    "use_scaled_rope": (BOOL, False), "max_seq_len": (POSITIVE_INT, False),
}


def read_params(ckpt_dir: str) -> dict:
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"checkpoint folder {ckpt_dir} does not exist: pass --ckpt_dir with params.json and consolidated.XX.pth, "
                        f"or a Hugging Face folder with config.json")
    path = os.path.join(ckpt_dir, "params.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: --ckpt_dir must hold Meta's params.json beside the consolidated.XX.pth shards")
    try:
        with open(path) as f:
            params = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(params, dict) or not all(k in params for k in ("dim", "n_layers", "n_heads")):
        raise UserError(f"{path} lacks dim, n_layers or n_heads: is it LLaMA's params.json?")
    check_fields(params, META_FIELDS, path)
    if params.get("rope_scaling") is not None:
        params = dict(params, rope_scaling=check_rope_scaling(params["rope_scaling"], LLAMA3_SCALING, path))
    return params


def list_shards(ckpt_dir: str) -> List[str]:
    shards = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    if not shards:
        raise UserError(f"no consolidated.XX.pth shards in {ckpt_dir}: download the weights (./download.sh llama)")
    expected = [os.path.join(ckpt_dir, f"consolidated.{i:02d}.pth") for i in range(len(shards))]
    if shards != expected:
        raise UserError(f"shards in {ckpt_dir} are not numbered 00..{len(shards) - 1:02d}: {[os.path.basename(s) for s in shards]}")
    return shards


def load_shard(path: str) -> Dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, not a torch file at all
        raise UserError(f"cannot read {path} as a weights-only torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a dict of tensors")
    return sd


def meta_context_length(params: dict, path: str) -> int:
    """Meta's params.json does not say how long a context the model had: a `max_seq_len` there is
    used, else the family's: 131072 with use_scaled_rope (Llama 3.1+), 8192 for Llama 3.0 (its
    params.json states vocab_size), 2048 for LLaMA 1 and 2 (LLaMA 1's, and the default window of
    Meta's code; Llama 2 was trained on 4096)."""
    family = 131072 if params.get("use_scaled_rope") else 8192 if params.get("vocab_size", -1) > 0 else ModelArgs.max_seq_len
    value = params.get("max_seq_len", family)
    if not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: max_seq_len {value!r} is not a positive whole number")
    return value


def meta_embedding_split(params: dict, shape: Tuple[int, ...], mp: int, path: str) -> str:
    """How Meta's shards split tok_embeddings, from a shard's shape (MP > 1). With one shard the
    family decides where a reshard will split it: Llama 3's params.json states its vocab_size
    (128256), Llama 1/2's says -1."""
    if mp == 1:
        return "vocab" if params.get("vocab_size", -1) > 0 else "width"
    dim = params["dim"]
    if shape[1] == dim:
        return "vocab"  # Llama 3: VocabParallelEmbedding
    if shape[1] * mp == dim:
        return "width"  # Llama 1/2: ParallelEmbedding
    raise UserError(f"{path}: tok_embeddings.weight has shape {tuple(shape)}, neither a vocabulary nor a width split "
                    f"of dim {dim} into {mp} shards: wrong params.json, or a shard of another model")


def meta_vocab(params: dict, shape: Tuple[int, ...], mp: int, path: str) -> Tuple[int, str]:
    """The vocabulary of Meta's weights and their embedding split, from one shard's
    tok_embeddings shape (params.json's vocab_size, when stated, must agree)."""
    split = meta_embedding_split(params, shape, mp, path)
    vocab = shape[0] * (mp if split == "vocab" else 1)
    stated = params.get("vocab_size", -1)
    if stated > 0 and stated != vocab:
        raise UserError(f"{os.path.dirname(path)}/params.json says vocab_size {stated} but the weights have {vocab}")
    return vocab, split


def shard_tensor(name: str, t: torch.Tensor, mp: int, rank: int, embedding_split: str = "width") -> torch.Tensor:
    """Model-parallel rank `rank`'s piece of the full tensor `t` (a copy, never a view)."""
    d = shard_dim(name, embedding_split)
    if d is None:
        return t.clone()
    if t.shape[d] % mp:
        raise UserError(f"{name} of shape {tuple(t.shape)} cannot be split into {mp} equal shards along dim {d}")
    return t.chunk(mp, dim=d)[rank].clone()  # clone: a saved view would carry its whole storage


