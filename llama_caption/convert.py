"""A Hugging Face LLaMA folder to Meta's layout, at any model-parallel size.

    python -m llama_caption.convert --ckpt_dir Llama-3.2-1B --out llama-3.2-1b-meta --mp 2

Each output shard is read straight from the safetensors files, one rank's slices at a time (the
rotary rows of q and k put back in Meta's order), and written before the next is made: never the
whole model in memory twice. The result loads with `--ckpt_dir`, reshards with
`llama_caption.reshard`, and is what Meta's reference code reads:

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
from dataclasses import dataclass

import fire

from .checkpoint import HUGGING_FACE, open_checkpoint
from .config import Config, command, setting
from .distributed import check_model_parallel
from .errors import UserError
from .fileio import write_json, write_torch
from .model import LLAMA3_SCALING, ModelArgs
from .runtime import DTYPES
from .tokenizer import HFTokenizer, TiktokenTokenizer, find_tokenizer, load_tokenizer


@dataclass
class ConvertConfig(Config):
    ckpt_dir: str = setting(help="a Hugging Face LlamaForCausalLM folder (config.json, safetensors, tokenizer.json).")
    out: str = setting(help="a new folder for Meta's layout (params.json, consolidated.XX.pth, the tokenizer files).")
    mp: int = setting(1, "the model-parallel size of the result (number of shards); it must divide the heads.")
    dtype: str = setting("auto", "the dtype written: auto keeps the files' own, or fp32, fp16, bf16.")

    def check(self) -> None:
        self.at_least(1, "mp")
        self.one_of("dtype", ("auto",) + tuple(DTYPES))


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


def convert(ckpt_dir: str, out: str, mp: int = 1, dtype=None, quiet: bool = False) -> None:
    from .huggingface import HFWeights
    from .reshard import check_new_out, copy_tokenizer

    ckpt = open_checkpoint(ckpt_dir)
    if ckpt.format != HUGGING_FACE:
        raise UserError(f"{ckpt_dir} is already in Meta's layout: use python -m llama_caption.reshard for another --mp")
    args = ckpt.args
    check_model_parallel(mp, args.n_heads, args.kv_heads, "--mp")
    llama3 = is_llama3_tokenizer(ckpt_dir)
    split = "vocab" if llama3 else "width"
    size = args.vocab_size if llama3 else args.dim
    if size % mp:
        raise UserError(f"--mp {mp} must divide the embedding's {'vocabulary' if llama3 else 'width'} ({size})")
    params = meta_params(args, llama3)
    check_new_out(ckpt_dir, out)
    os.makedirs(out, exist_ok=True)
    weights = HFWeights(ckpt_dir, args, ckpt.tied)
    for r in range(mp):
        piece = {}
        for name in weights.meta_names(with_tied_output=True):
            t = weights.slice(name, mp, r, split)
            piece[name] = t if dtype is None else t.to(dtype)
        path = os.path.join(out, f"consolidated.{r:02d}.pth")
        write_torch(path, piece)
        del piece
        if not quiet:
            print(f"wrote {path}")
    weights.close()
    write_json(os.path.join(out, "params.json"), params)
    copy_tokenizer(ckpt_dir, out)


def run(cfg: ConvertConfig) -> None:
    convert(cfg.ckpt_dir, cfg.out, cfg.mp, None if cfg.dtype == "auto" else DTYPES[cfg.dtype])


main = command(ConvertConfig, run, "Convert the Hugging Face LLaMA in CKPT_DIR to Meta's layout in OUT, in MP shards.")

if __name__ == "__main__":
    fire.Fire(main)
