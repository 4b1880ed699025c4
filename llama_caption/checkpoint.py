"""Meta's LLaMA checkpoints: loading one model-parallel rank, writing, resharding.

A checkpoint folder holds `params.json` and one `consolidated.XX.pth` per model-parallel rank;
the shards split each weight along the dimension `model.shard_dim` names. Every file is
untrusted: `torch.load(..., weights_only=True)`, strict key and shape checks, one-line errors.
"""

import glob
import json
import os
from typing import Dict, List, Tuple

import torch
from fairscale.nn.model_parallel import initialize as fs_init

from .errors import UserError
from .fileio import write_json, write_torch
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


def load_llama(ckpt_dir: str, tokenizer_path: str, max_seq_len: int = 512, max_batch_size: int = 32,
               device="cpu", dtype=torch.float32) -> Tuple[Transformer, Tokenizer]:
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
    args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                                 vocab_size=tokenizer.n_words)
    if args.n_heads % mp or args.kv_heads % mp:
        raise UserError(f"model-parallel size {mp} does not divide n_heads {args.n_heads} / n_kv_heads {args.kv_heads}")
    check_state_dict(sd, args, mp, shards[rank])
    with skip_weight_init(), torch.device("meta"):
        model = Transformer(args)
    weights = {k: v.to(device=device, dtype=dtype) for k, v in sd.items() if k not in IGNORED_KEYS}
    del sd
    model.load_state_dict(weights, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def random_state_dict(args: ModelArgs, seed: int = 0, std: float = 0.02) -> Dict[str, torch.Tensor]:
    """A full (MP=1) random LLaMA in Meta's layout, for tests and the demo's stand-in."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in param_shapes(args).items():
        if k.endswith("norm.weight"):
            sd[k] = torch.ones(shape)
        else:
            sd[k] = torch.randn(shape, generator=g) * std
    return sd


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


def write_meta_checkpoint(ckpt_dir: str, params: dict, state_dict: Dict[str, torch.Tensor], mp: int = 1) -> None:
    """Write a full state dict as Meta's params.json + consolidated.XX.pth, split for `mp` ranks."""
    os.makedirs(ckpt_dir, exist_ok=True)
    for r in range(mp):
        write_torch(os.path.join(ckpt_dir, f"consolidated.{r:02d}.pth"),
                    {k: shard_tensor(k, v, mp, r) for k, v in state_dict.items()})
    write_json(os.path.join(ckpt_dir, "params.json"), params)


# ---------------------------------------------------------------------------------------------
# Our own checkpoints: only the trainable weights, never the frozen LLaMA or CLIP.
#
#   OUT_DIR/checkpoints/step-0001000/projection.safetensors   trainable weights (+ config in metadata)
#                                    trainer.safetensors      optimizer tensors, RNG state
#                                    trainer.json             step, epoch, scheduler, param groups, config
#   OUT_DIR/checkpoints/latest                                the newest complete checkpoint's name
#
# A checkpoint folder is filled under a temporary name and renamed when complete; `latest` is
# rewritten atomically after that, so a crash at any moment leaves the previous one usable.
# ---------------------------------------------------------------------------------------------

PROJECTION_FILE = "projection.safetensors"


def save_training_checkpoint(out_dir: str, step: int, projection_state: Dict[str, torch.Tensor],
                             optimizer_state: dict, trainer: dict, config: dict, keep_last: int = 3) -> str:
    import shutil
    import tempfile

    from safetensors.torch import save_file

    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
    cfg = json.dumps(config, sort_keys=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in projection_state.items()},
              os.path.join(tmp, PROJECTION_FILE), metadata={"config": cfg})
    tensors = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng_cuda"] = torch.cuda.get_rng_state()
    for idx, st in optimizer_state["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = val.detach().cpu().contiguous()
    save_file(tensors, os.path.join(tmp, "trainer.safetensors"))
    with open(os.path.join(tmp, "trainer.json"), "w") as f:
        json.dump(dict(trainer, step=step, config=config, param_groups=optimizer_state["param_groups"]), f, indent=1)
    final = os.path.join(root, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    from .fileio import write_text

    write_text(os.path.join(root, "latest"), name + "\n")
    done = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def find_checkpoint(path: str, flag: str = "--checkpoint") -> str:
    """A checkpoint folder from a run folder (its latest), a checkpoints/ folder, or itself."""
    for candidate in (os.path.join(path, "checkpoints", "latest"), os.path.join(path, "latest")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                name = f.read().strip()
            return os.path.join(os.path.dirname(candidate), name)
    if os.path.isfile(os.path.join(path, PROJECTION_FILE)):
        return path
    raise UserError(f"{flag} {path}: no checkpoint there (expected RUN/checkpoints/latest or {PROJECTION_FILE})")


def load_projection_checkpoint(ckpt: str, flag: str = "--checkpoint") -> Tuple[Dict[str, torch.Tensor], dict]:
    """The trainable weights and the training config of a checkpoint folder."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(ckpt, PROJECTION_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{flag}: {path} is missing")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    if "config" not in meta:
        raise UserError(f"{path} carries no training config: it was not written by captioning_training.py")
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError:
        raise UserError(f"{path}: the stored training config is not valid JSON") from None
    return weights, config


def load_trainer_state(ckpt: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    jpath, tpath = os.path.join(ckpt, "trainer.json"), os.path.join(ckpt, "trainer.safetensors")
    if not (os.path.isfile(jpath) and os.path.isfile(tpath)):
        raise UserError(f"{ckpt} lacks trainer.json / trainer.safetensors: it cannot be resumed")
    with open(jpath) as f:
        trainer = json.load(f)
    return trainer, load_file(tpath)


def optimizer_state_from(trainer: dict, tensors: Dict[str, torch.Tensor]) -> dict:
    state: Dict[int, dict] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    return {"state": state, "param_groups": trainer["param_groups"]}
