"""Meta's LLaMA checkpoints: loading one model-parallel rank, writing, resharding.

A checkpoint folder holds `params.json` and one `consolidated.XX.pth` per model-parallel rank;
the shards split each weight along the dimension `model.shard_dim` names. (Our own training
checkpoints are in runs.py.) Every file is
untrusted: `torch.load(..., weights_only=True)`, strict key and shape checks, one-line errors.
"""

import glob
import json
import os
from typing import Dict, List, Tuple

import torch
from fairscale.nn.model_parallel import initialize as fs_init

from .distributed import check_model_parallel
from .errors import UserError
from .model import ModelArgs, Transformer, param_shapes, shard_dim, skip_weight_init
from .tokenizer import Tokenizer

IGNORED_KEYS = ("rope.freqs",)  # a buffer Meta saved by accident in v1; it is recomputed


def read_params(ckpt_dir: str) -> dict:
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"checkpoint folder {ckpt_dir} does not exist: pass --ckpt_dir with params.json and consolidated.XX.pth")
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


def sharded_shape(shape: Tuple[int, ...], name: str, mp: int) -> Tuple[int, ...]:
    d = shard_dim(name)
    if d is None:
        return tuple(shape)
    s = list(shape)
    s[d] //= mp
    return tuple(s)


def check_state_dict(sd: Dict[str, torch.Tensor], args: ModelArgs, mp: int, path: str) -> None:
    """Strict key and shape check of one rank's shard against the architecture in params.json."""
    expected = {k: sharded_shape(v, k, mp) for k, v in param_shapes(args).items()}
    got = {k for k in sd if k not in IGNORED_KEYS}
    missing, unexpected = sorted(set(expected) - got), sorted(got - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        raise UserError(f"{path} does not match params.json: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise UserError(
                f"{path}: {k} has shape {tuple(sd[k].shape)}, params.json with model-parallel size {mp} "
                f"implies {shape}: wrong params.json, or a shard of another model"
            )


def context_length(ckpt_dir: str) -> int:
    """The most positions a sequence may use with this LLaMA. Meta's params.json does not say
    (LLaMA 1 was trained on 2048 tokens, Llama 2 on 4096); a `max_seq_len` there is used, else
    2048, LLaMA 1's and the default KV-cache window of Meta's code."""
    value = read_params(ckpt_dir).get("max_seq_len", ModelArgs.max_seq_len)
    if not isinstance(value, int) or value < 1:
        raise UserError(f"{ckpt_dir}/params.json: max_seq_len {value!r} is not a positive whole number")
    return value


def load_llama(ckpt_dir: str, tokenizer_path: str, max_seq_len: int = 512, device="cpu",
               dtype=torch.float32) -> Tuple[Transformer, Tokenizer]:
    """This model-parallel rank's frozen LLaMA, on `device` in `dtype`, and the tokenizer.

    fairscale's model parallelism must be initialised (distributed.setup) with a size equal to
    the number of shards.
    """
    params = read_params(ckpt_dir)
    shards = list_shards(ckpt_dir)
    mp, rank = fs_init.get_model_parallel_world_size(), fs_init.get_model_parallel_rank()
    if len(shards) != mp:
        raise UserError(
            f"{ckpt_dir} has {len(shards)} model-parallel shard(s) but this run has model-parallel size {mp}: "
            f"launch with torchrun --nproc_per_node {len(shards)} (or a multiple, for data parallelism), "
            f"or reshard with python -m llama_caption.reshard --ckpt_dir {ckpt_dir} --mp {mp} --out NEW_DIR"
        )
    tokenizer = Tokenizer(tokenizer_path)
    sd = load_shard(shards[rank])
    emb = sd.get("tok_embeddings.weight")
    ckpt_vocab = emb.shape[0] if emb is not None else params.get("vocab_size", -1)
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != ckpt_vocab:
        raise UserError(f"{ckpt_dir}/params.json says vocab_size {params['vocab_size']} but the weights have {ckpt_vocab}")
    if tokenizer.n_words != ckpt_vocab:
        raise UserError(
            f"tokenizer {tokenizer_path} has {tokenizer.n_words} words but the checkpoint in {ckpt_dir} "
            f"has {ckpt_vocab}: pass the tokenizer.model that came with these weights"
        )
    args = ModelArgs.from_params(params, max_seq_len=max_seq_len, vocab_size=tokenizer.n_words)
    check_model_parallel(mp, args.n_heads, args.kv_heads, "model-parallel size")
    check_state_dict(sd, args, mp, shards[rank])
    with skip_weight_init(), torch.device("meta"):
        model = Transformer(args)
    weights = {k: v.to(device=device, dtype=dtype) for k, v in sd.items() if k not in IGNORED_KEYS}
    del sd
    model.load_state_dict(weights, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def shard_tensor(name: str, t: torch.Tensor, mp: int, rank: int) -> torch.Tensor:
    """Model-parallel rank `rank`'s piece of the full tensor `t` (a copy, never a view)."""
    d = shard_dim(name)
    if d is None:
        return t.clone()
    if t.shape[d] % mp:
        raise UserError(f"{name} of shape {tuple(t.shape)} cannot be split into {mp} equal shards along dim {d}")
    return t.chunk(mp, dim=d)[rank].clone()  # clone: a saved view would carry its whole storage


def merge_tensor(name: str, pieces: List[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every rank's piece (replicated tensors: rank 0's)."""
    d = shard_dim(name)
    if d is None or len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=d)
