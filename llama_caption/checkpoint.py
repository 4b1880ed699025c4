"""LLaMA checkpoints: Meta's layout or Hugging Face's, told apart by the folder's contents.

- Meta's: `params.json` and one `consolidated.XX.pth` per model-parallel rank; the shards split
  each weight along the dimension `model.shard_dim` names (the token embedding on its width for
  Llama 1/2, on the vocabulary for Llama 3). A run's model-parallel size is the shard count.
- Hugging Face's: `config.json` and safetensors files (huggingface.py); any model-parallel size
  that divides the heads, each rank reading only its slices.

`open_checkpoint` reads what a folder is without loading weights; `load_llama` builds this rank's
frozen model. (Our own training checkpoints are in runs.py.) Every file is untrusted:
`torch.load(..., weights_only=True)`, safetensors, strict key and shape checks, one-line errors.
"""

import glob
import json
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
from fairscale.nn.model_parallel import initialize as fs_init

from .distributed import check_model_parallel
from .errors import UserError
from .model import ModelArgs, Transformer, param_shapes, shard_dim, skip_weight_init
from .tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer_path

META, HUGGING_FACE = "meta", "hugging face"

IGNORED_KEYS = ("rope.freqs",)  # a buffer Meta saved by accident in v1; it is recomputed


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


def sharded_shape(shape: Tuple[int, ...], name: str, mp: int, embedding_split: str = "width") -> Tuple[int, ...]:
    d = shard_dim(name, embedding_split)
    if d is None:
        return tuple(shape)
    s = list(shape)
    s[d] //= mp
    return tuple(s)


def check_state_dict(sd: Dict[str, torch.Tensor], args: ModelArgs, mp: int, path: str, tied: bool = False,
                     described_by: str = "params.json") -> None:
    """Strict key and shape check of one rank's shard against the architecture in params.json
    (or config.json). `tied`: no output.weight, the output layer is the token embedding."""
    expected = {k: sharded_shape(v, k, mp, args.embedding_split) for k, v in param_shapes(args).items()
                if not (tied and k == "output.weight")}
    got = {k for k in sd if k not in IGNORED_KEYS}
    missing, unexpected = sorted(set(expected) - got), sorted(got - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        raise UserError(f"{path} does not match {described_by}: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise UserError(
                f"{path}: {k} has shape {tuple(sd[k].shape)}, {described_by} with model-parallel size {mp} "
                f"implies {shape}: wrong params.json, or a shard of another model"
            )


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


@dataclass
class LlamaCheckpoint:
    """What a checkpoint folder holds, read without loading its weights."""

    folder: str
    format: str  # META or HUGGING_FACE
    params: dict  # params.json or config.json, as written
    args: ModelArgs  # the architecture (Meta: vocab_size and embedding split come with the weights)
    files: List[str]  # Meta: the shards; Hugging Face: the safetensors files
    context: int  # the most positions a sequence may use
    tied: bool = False  # Hugging Face: tie_word_embeddings with no lm_head.weight
    described_by: str = field(default="params.json", repr=False)

    def model_parallel_size(self, requested: int = 0, flag: str = "--model_parallel") -> int:
        """The model-parallel size a run uses: Meta's shard count, or for a Hugging Face folder
        `requested` (0: 1), which must divide the heads and the vocabulary."""
        if self.format == META:
            if requested not in (0, len(self.files)):
                raise UserError(
                    f"{flag} {requested}: {self.folder} has {len(self.files)} model-parallel shard(s); reshard it first "
                    f"(python -m llama_caption.reshard --ckpt_dir {self.folder} --mp {requested} --out NEW_DIR)")
            mp = len(self.files)
        else:
            mp = requested or 1
        check_model_parallel(mp, self.args.n_heads, self.args.kv_heads, flag)
        if self.format == HUGGING_FACE and self.args.vocab_size % mp:
            raise UserError(f"{flag} {mp} must divide the vocabulary of {self.args.vocab_size} tokens")
        return mp

    def vocab_size(self) -> int:
        """The vocabulary of the weights (Meta's params.json often says -1: read shard 0's
        embedding shape, memory-mapped)."""
        if self.format == HUGGING_FACE or self.args.vocab_size > 0:
            return self.args.vocab_size
        emb = load_shard(self.files[0]).get("tok_embeddings.weight")
        if emb is None:
            raise UserError(f"{self.files[0]} has no tok_embeddings.weight: is it a LLaMA shard?")
        return meta_vocab(self.params, tuple(emb.shape), len(self.files), self.files[0])[0]

    def provenance(self) -> dict:
        return {"format": self.format, "params": self.params,
                "files": [[os.path.relpath(p, self.folder), os.path.getsize(p)] for p in self.files]}


def open_checkpoint(ckpt_dir: str) -> LlamaCheckpoint:
    """The checkpoint in `ckpt_dir`: Meta's layout when it has params.json, Hugging Face's when it
    has config.json."""
    if not os.path.isdir(ckpt_dir):
        read_params(ckpt_dir)  # its message
    if os.path.isfile(os.path.join(ckpt_dir, "params.json")) or glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")):
        params = read_params(ckpt_dir)
        path = os.path.join(ckpt_dir, "params.json")
        args = ModelArgs.from_params(params)
        return LlamaCheckpoint(ckpt_dir, META, params, args, list_shards(ckpt_dir), meta_context_length(params, path))
    if os.path.isfile(os.path.join(ckpt_dir, "config.json")):
        from . import huggingface

        path = os.path.join(ckpt_dir, "config.json")
        config = huggingface.read_config(ckpt_dir)
        args = huggingface.model_args(config, path)
        files = huggingface.weight_files(ckpt_dir)
        tied = bool(config.get("tie_word_embeddings", False)) and "lm_head.weight" not in files
        context = config.get("max_position_embeddings", ModelArgs.max_seq_len)
        return LlamaCheckpoint(ckpt_dir, HUGGING_FACE, config, args, sorted(set(files.values())), context, tied,
                               "config.json")
    raise UserError(f"{ckpt_dir} holds neither params.json (Meta's layout, with consolidated.XX.pth) nor config.json "
                    f"(a Hugging Face folder, with safetensors): pass the folder of the weights as --ckpt_dir")


def context_length(ckpt_dir: str) -> int:
    """The most positions a sequence may use with the LLaMA in `ckpt_dir`."""
    return open_checkpoint(ckpt_dir).context


def rank_state(ckpt: LlamaCheckpoint, mp: int, rank: int) -> Tuple[Dict[str, torch.Tensor], ModelArgs, bool, str]:
    """This rank's weights in Meta's names (as stored: mmapped, file dtype), the full architecture
    (vocab_size and embedding split filled in), whether the output layer is the embedding, and
    the file the weights came from (for messages)."""
    if ckpt.format == HUGGING_FACE:
        from .huggingface import HFWeights

        weights = HFWeights(ckpt.folder, ckpt.args, ckpt.tied)
        sd = weights.rank_state(mp, rank)
        weights.close()
        return sd, ckpt.args, ckpt.tied, ckpt.files[0] if len(ckpt.files) == 1 else ckpt.folder
    path = ckpt.files[rank]
    sd = {k: v for k, v in load_shard(path).items() if k not in IGNORED_KEYS}
    emb = sd.get("tok_embeddings.weight")
    if emb is None:
        raise UserError(f"{path} does not match params.json: missing keys ['tok_embeddings.weight']")
    vocab, split = meta_vocab(ckpt.params, tuple(emb.shape), mp, path)
    tied = "output.weight" not in sd
    if tied and mp > 1 and split != "vocab":
        raise UserError(f"{path} has no output.weight and splits the embedding on its width: the output layer "
                        f"cannot be tied to it; reshard to one shard or use the checkpoint's own output.weight")
    return sd, replace(ckpt.args, vocab_size=vocab, embedding_split=split), tied, path


def load_llama(ckpt_dir: str, tokenizer_path: Optional[str] = None, max_seq_len: int = 512, device="cpu",
               dtype=torch.float32) -> Tuple[Transformer, Tokenizer]:
    """This model-parallel rank's frozen LLaMA, on `device` in `dtype`, and the tokenizer
    (`tokenizer_path`, or the one that came with the checkpoint).

    fairscale's model parallelism must be initialised (distributed.setup); with Meta's layout
    its size must equal the number of shards.
    """
    ckpt = open_checkpoint(ckpt_dir)
    mp, rank = fs_init.get_model_parallel_world_size(), fs_init.get_model_parallel_rank()
    if ckpt.format == META and len(ckpt.files) != mp:
        raise UserError(
            f"{ckpt_dir} has {len(ckpt.files)} model-parallel shard(s) but this run has model-parallel size {mp}: "
            f"launch with torchrun --nproc_per_node {len(ckpt.files)} (or a multiple, for data parallelism), "
            f"or reshard with python -m llama_caption.reshard --ckpt_dir {ckpt_dir} --mp {mp} --out NEW_DIR"
        )
    ckpt.model_parallel_size(mp, "model-parallel size")
    tokenizer = load_tokenizer(resolve_tokenizer_path(tokenizer_path, ckpt_dir))
    sd, args, tied, path = rank_state(ckpt, mp, rank)
    if tokenizer.n_words != args.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.path} has {tokenizer.n_words} words but the checkpoint in {ckpt_dir} "
            f"has {args.vocab_size}: pass the tokenizer that came with these weights"
        )
    args = replace(args, max_seq_len=max_seq_len)
    check_state_dict(sd, args, mp, path, tied, ckpt.described_by)
    with skip_weight_init(), torch.device("meta"):
        model = Transformer(args)
    weights = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    del sd
    if tied:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if tied:  # one tensor, not two Parameters that happen to share storage
        model.output.weight = model.tok_embeddings.weight
    model.requires_grad_(False)
    return model.eval(), tokenizer


def shard_tensor(name: str, t: torch.Tensor, mp: int, rank: int, embedding_split: str = "width") -> torch.Tensor:
    """Model-parallel rank `rank`'s piece of the full tensor `t` (a copy, never a view)."""
    d = shard_dim(name, embedding_split)
    if d is None:
        return t.clone()
    if t.shape[d] % mp:
        raise UserError(f"{name} of shape {tuple(t.shape)} cannot be split into {mp} equal shards along dim {d}")
    return t.chunk(mp, dim=d)[rank].clone()  # clone: a saved view would carry its whole storage


def merge_tensor(name: str, pieces: List[torch.Tensor], embedding_split: str = "width") -> torch.Tensor:
    """The full tensor from every rank's piece (replicated tensors: rank 0's)."""
    d = shard_dim(name, embedding_split)
    if d is None or len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=d)
