"""Rewrite a LLaMA checkpoint in Meta's layout for another model-parallel size.

    python -m llama_caption.reshard --ckpt_dir llama/13B --mp 1 --out llama/13B-mp1

The source shards are memory-mapped and each output shard is assembled one tensor at a time, so
the peak is one output shard plus one full tensor, never the whole model twice. The token
embedding keeps its family's split (Llama 1/2: width, Llama 3: vocabulary). A Hugging Face
folder as --ckpt_dir is converted to Meta's layout at --mp (the same as llama_caption.convert).
"""

import os
import shutil
from dataclasses import dataclass

import fire

from .checkpoint import (HUGGING_FACE, list_shards, load_shard, meta_embedding_split, merge_tensor, open_checkpoint,
                         read_params, shard_tensor)
from .config import Config, command, setting
from .distributed import check_model_parallel
from .errors import UserError
from .fileio import check_output_dir, write_json, write_torch
from .model import ModelArgs


@dataclass
class ReshardConfig(Config):
    ckpt_dir: str = setting(help="folder with params.json and consolidated.XX.pth (Meta's layout); a Hugging Face folder is converted.")
    mp: int = setting(help="the new model-parallel size; it must divide n_heads (and n_kv_heads).")
    out: str = setting(help="a new folder for the resharded checkpoint (params.json and the tokenizer files are copied).")


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def copy_tokenizer(src: str, out: str) -> None:
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


def check_new_out(ckpt_dir: str, out: str) -> None:
    if os.path.abspath(out) == os.path.abspath(ckpt_dir):
        raise UserError("--out must be a new folder, not --ckpt_dir itself")
    check_output_dir(out, "--out")
    if os.path.isdir(out) and (list_existing(out) or os.path.exists(os.path.join(out, "params.json"))):
        raise UserError(f"{out} already holds a checkpoint (consolidated.XX.pth or params.json): pick an empty --out")


def reshard(ckpt_dir: str, mp: int, out: str, quiet: bool = False) -> None:
    if open_checkpoint(ckpt_dir).format == HUGGING_FACE:
        from .convert import convert

        return convert(ckpt_dir, out, mp, quiet=quiet)
    params = read_params(ckpt_dir)
    shards = list_shards(ckpt_dir)
    args = ModelArgs.from_params(params)
    check_model_parallel(mp, args.n_heads, args.kv_heads, "--mp")
    check_new_out(ckpt_dir, out)
    sources = [load_shard(p) for p in shards]  # memory-mapped: nothing is read yet
    keys = list(sources[0])
    for p, sd in zip(shards[1:], sources[1:]):
        if set(sd) != set(keys):
            raise UserError(f"{p} has other keys than {shards[0]}: the shards are not of one model")
    if "tok_embeddings.weight" not in keys:
        raise UserError(f"{shards[0]} has no tok_embeddings.weight: is it a LLaMA shard?")
    split = meta_embedding_split(params, tuple(sources[0]["tok_embeddings.weight"].shape), len(shards), shards[0])
    os.makedirs(out, exist_ok=True)
    for r in range(mp):
        piece = {k: shard_tensor(k, merge_tensor(k, [sd[k] for sd in sources], split), mp, r, split) for k in keys}
        path = os.path.join(out, f"consolidated.{r:02d}.pth")
        write_torch(path, piece)
        del piece
        if not quiet:
            print(f"wrote {path}")
    write_json(os.path.join(out, "params.json"), params)
    copy_tokenizer(ckpt_dir, out)


def list_existing(folder: str):
    return [f for f in os.listdir(folder) if f.startswith("consolidated.") and f.endswith(".pth")]


main = command(ReshardConfig, lambda cfg: reshard(cfg.ckpt_dir, cfg.mp, cfg.out),
               "Reshard the checkpoint in CKPT_DIR into MP model-parallel shards written to OUT.")

if __name__ == "__main__":
    fire.Fire(main)
