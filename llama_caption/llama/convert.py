"""Write a LLaMA checkpoint in Meta's layout at any model-parallel size: `reshard` a Meta folder,
`convert` a Hugging Face one.

    python -m llama_caption reshard --ckpt_dir llama/13B --mp 1 --out llama/13B-mp1
    python -m llama_caption convert --ckpt_dir Llama-3.2-1B --out llama-3.2-1b-meta --mp 2

Both are one loop over the checkpoint's weight source (sources.py): each output shard is
assembled from the memory-mapped input one tensor at a time and written before the next is made,
so the peak is one output shard plus one whole tensor, never the model twice. Resharding keeps
the family's embedding split (Llama 1/2: width, Llama 3: vocabulary). A converted folder loads
with `--ckpt_dir`, reshards, and is what Meta's reference code reads:

- the family decides the embedding split and params.json: a Llama 3 tokenizer (its BOS is
  `<|begin_of_text|>`) gives Meta's Llama 3 layout (embedding split on the vocabulary, params.json
  with `vocab_size`, `rope_theta`, `use_scaled_rope`); any other gives Llama 1/2's (split on the
  width, `vocab_size` -1);
- `output.weight` is always written, a copy of the embedding for a model with tied embeddings,
  since Meta's code builds its output layer from it;
- llama3 rope scaling with numbers other than Meta's fixed ones (factor 8, 1, 4, 8192; Llama
  3.2's files say factor 32) is kept in a `rope_scaling` entry that Meta's Llama 3 code ignores
  and ours reads;
- the tokenizer files (tokenizer.json, tokenizer_config.json, and tokenizer.model if present) are
  copied beside the shards.
"""

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Config, command, setting
from ..distributed import check_model_parallel
from ..errors import UserError
from ..fileio import check_output_dir, write_json, write_torch
from .checkpoint import HUGGING_FACE, META, LlamaCheckpoint, open_checkpoint
from .model import LLAMA3_SCALING, ModelArgs
from ..runtime import DTYPES
from .tokenizer import TOKENIZER_FILES, HFTokenizer, TiktokenTokenizer, find_tokenizer, load_tokenizer


@dataclass
class ConvertConfig(Config):
    ckpt_dir: str = setting(help="a Hugging Face LlamaForCausalLM folder (config.json, safetensors, tokenizer.json).")
    out: str = setting(help="a new folder for Meta's layout (params.json, consolidated.XX.pth, the tokenizer files).")
    mp: int = setting(1, "the model-parallel size of the result (number of shards); it must divide the heads.")
    dtype: str = setting("auto", "the dtype written: auto keeps the files' own, or fp32, fp16, bf16.")

    def check(self) -> None:
        self.at_least(1, "mp")
        self.one_of("dtype", ("auto",) + tuple(DTYPES))


@dataclass
class ReshardConfig(Config):
    ckpt_dir: str = setting(help="folder with params.json and consolidated.XX.pth (Meta's layout); a Hugging Face folder is converted.")
    mp: int = setting(help="the new model-parallel size; it must divide n_heads (and n_kv_heads).")
    out: str = setting(help="a new folder for the resharded checkpoint (params.json and the tokenizer files are copied).")

    def check(self) -> None:
        self.at_least(1, "mp")


def ffn_params(dim: int, hidden: int) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's SwiGLU rule give `hidden`: Meta's own
    numbers where one fits (Llama 2: 256; Llama 3 8B: 1024 and 1.3; 3.2 1B: 256 and 1.5)."""
    for multiple_of in (256, 1024):
        for multiplier in (None, 1.3, 1.5):
            args = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
            if args.hidden_dim == hidden:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    base = int(2 * (4 * dim) / 3)
    if base <= hidden:
        return {"multiple_of": hidden, "ffn_dim_multiplier": None}
    return {"multiple_of": 1, "ffn_dim_multiplier": (hidden + 0.5) / base}


def meta_params(args: ModelArgs, llama3: bool) -> dict:
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "vocab_size": args.vocab_size if llama3 else -1, **ffn_params(args.dim, args.hidden_dim),
              "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
    if params["ffn_dim_multiplier"] is None:
        del params["ffn_dim_multiplier"]
    if args.rope_scaling is not None:
        if not llama3:
            raise UserError("llama3 rope scaling in a model whose tokenizer is not Llama 3's: cannot write Meta's Llama 1/2 layout")
        params["use_scaled_rope"] = True
        if args.rope_scaling != LLAMA3_SCALING:
            params["rope_scaling"] = dict(args.rope_scaling)
    return params


def is_llama3_tokenizer(ckpt_dir: str) -> bool:
    path = find_tokenizer(ckpt_dir)
    if path is None:
        raise UserError(f"{ckpt_dir} has no tokenizer.json: the converted folder needs the tokenizer that came with the weights")
    tok = load_tokenizer(path)
    if isinstance(tok, HFTokenizer):
        return tok.tok.id_to_token(tok.bos_id) == "<|begin_of_text|>"
    return isinstance(tok, TiktokenTokenizer)


def copy_tokenizer(src: str, out: str) -> None:
    for name in TOKENIZER_FILES + ("tokenizer_config.json",):  # the files we read, and HF's settings
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


def check_new_out(ckpt_dir: str, out: str) -> None:
    if os.path.abspath(out) == os.path.abspath(ckpt_dir):
        raise UserError("--out must be a new folder, not --ckpt_dir itself")
    check_output_dir(out, "--out")
    if os.path.isdir(out) and any(f.startswith("consolidated.") or f == "params.json" for f in os.listdir(out)):
        raise UserError(f"{out} already holds a checkpoint (consolidated.XX.pth or params.json): pick an empty --out")


def write_meta(ckpt: LlamaCheckpoint, out: str, mp: int, split: str, params: dict,
               dtype: Optional[torch.dtype] = None, quiet: bool = False) -> None:
    """Meta's layout of `ckpt` in `out`: `mp` shards cut from its weight source (the embedding
    along `split`; `output.weight` always written, a copy of the embedding when tied), then
    params.json and the tokenizer files."""
    source = ckpt.source()
    os.makedirs(out, exist_ok=True)
    for r in range(mp):
        piece = {}
        for name in source.names(with_tied_output=True):
            t = source.slice(name, mp, r, split)
            t = t if dtype is None else t.to(dtype)
            # A piece that is a view of a stored tensor would be saved with all of its storage.
            piece[name] = t.clone() if t.untyped_storage().nbytes() != t.nbytes else t
        path = os.path.join(out, f"consolidated.{r:02d}.pth")
        write_torch(path, piece)
        del piece
        if not quiet:
            print(f"wrote {path}")
    ckpt.release()
    write_json(os.path.join(out, "params.json"), params)
    copy_tokenizer(ckpt.folder, out)


def reshard(ckpt_dir: str, mp: int, out: str, quiet: bool = False) -> None:
    """Meta's folder at another model-parallel size (a Hugging Face folder is converted)."""
    ckpt = open_checkpoint(ckpt_dir)
    if ckpt.format == HUGGING_FACE:
        return convert(ckpt_dir, out, mp, quiet=quiet, ckpt=ckpt)
    check_model_parallel(mp, ckpt.args.n_heads, ckpt.args.kv_heads, "--mp")
    check_new_out(ckpt_dir, out)
    source = ckpt.source()  # reads and checks every shard's keys and shapes before anything is written
    ckpt.model_parallel_size(mp, "--mp")
    write_meta(ckpt, out, mp, source.stored_split, ckpt.params, quiet=quiet)


def convert(ckpt_dir: str, out: str, mp: int = 1, dtype=None, quiet: bool = False,
            ckpt: Optional[LlamaCheckpoint] = None) -> None:
    """A Hugging Face folder in Meta's layout (see the module docstring)."""
    ckpt = ckpt or open_checkpoint(ckpt_dir)
    if ckpt.format == META:
        raise UserError(f"{ckpt_dir} is already in Meta's layout: use python -m llama_caption reshard for another --mp")
    args = ckpt.args
    check_model_parallel(mp, args.n_heads, args.kv_heads, "--mp")
    llama3 = is_llama3_tokenizer(ckpt_dir)
    split = "vocab" if llama3 else "width"
    size = args.vocab_size if llama3 else args.dim
    if size % mp:
        raise UserError(f"--mp {mp} must divide the embedding's {'vocabulary' if llama3 else 'width'} ({size})")
    params = meta_params(args, llama3)
    check_new_out(ckpt_dir, out)
    write_meta(ckpt, out, mp, split, params, dtype, quiet)


def run_convert(cfg: ConvertConfig) -> None:
    convert(cfg.ckpt_dir, cfg.out, cfg.mp, None if cfg.dtype == "auto" else DTYPES[cfg.dtype])


convert_main = command(ConvertConfig, run_convert,
                       "Convert the Hugging Face LLaMA in CKPT_DIR to Meta's layout in OUT, in MP shards.")
reshard_main = command(ReshardConfig, lambda cfg: reshard(cfg.ckpt_dir, cfg.mp, cfg.out),
                       "Reshard the checkpoint in CKPT_DIR into MP model-parallel shards written to OUT.")
