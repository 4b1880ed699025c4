"""Rewrite a LLaMA checkpoint for another model-parallel size.

    python -m llama_caption.reshard --ckpt_dir llama/13B --mp 1 --out llama/13B-mp1

The source shards are memory-mapped and each output shard is assembled one tensor at a time, so
the peak is one output shard plus one full tensor, never the whole model twice.
"""

import os
import shutil
from dataclasses import dataclass

import fire

from .checkpoint import list_shards, load_shard, merge_tensor, read_params, shard_tensor
from .config import Config, command, setting
from .distributed import check_model_parallel
from .errors import UserError
from .fileio import check_output_dir, write_json, write_torch
from .model import ModelArgs


@dataclass
class ReshardConfig(Config):
    ckpt_dir: str = setting(help="folder with params.json and consolidated.XX.pth (Meta's layout).")
    mp: int = setting(help="the new model-parallel size; it must divide n_heads (and n_kv_heads).")
    out: str = setting(help="a new folder for the resharded checkpoint (params.json and tokenizer.model are copied).")


def reshard(ckpt_dir: str, mp: int, out: str, quiet: bool = False) -> None:
    params = read_params(ckpt_dir)
    shards = list_shards(ckpt_dir)
    args = ModelArgs.from_params(params)
    check_model_parallel(mp, args.n_heads, args.kv_heads, "--mp")
    if os.path.abspath(out) == os.path.abspath(ckpt_dir):
        raise UserError("--out must be a new folder, not --ckpt_dir itself")
    check_output_dir(out, "--out")
    if os.path.isdir(out) and (list_existing(out) or os.path.exists(os.path.join(out, "params.json"))):
        raise UserError(f"{out} already holds a checkpoint (consolidated.XX.pth or params.json): pick an empty --out")
    sources = [load_shard(p) for p in shards]  # memory-mapped: nothing is read yet
    keys = list(sources[0])
    for p, sd in zip(shards[1:], sources[1:]):
        if set(sd) != set(keys):
            raise UserError(f"{p} has other keys than {shards[0]}: the shards are not of one model")
    os.makedirs(out, exist_ok=True)
    for r in range(mp):
        piece = {k: shard_tensor(k, merge_tensor(k, [sd[k] for sd in sources]), mp, r) for k in keys}
        path = os.path.join(out, f"consolidated.{r:02d}.pth")
        write_torch(path, piece)
        del piece
        if not quiet:
            print(f"wrote {path}")
    write_json(os.path.join(out, "params.json"), params)
    tok = os.path.join(ckpt_dir, "tokenizer.model")
    if os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(out, "tokenizer.model"))


def list_existing(folder: str):
    return [f for f in os.listdir(folder) if f.startswith("consolidated.") and f.endswith(".pth")]


main = command(ReshardConfig, lambda cfg: reshard(cfg.ckpt_dir, cfg.mp, cfg.out),
               "Reshard the checkpoint in CKPT_DIR into MP model-parallel shards written to OUT.")

if __name__ == "__main__":
    fire.Fire(main)
