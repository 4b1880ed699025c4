"""LLaMA checkpoints: Meta's layout or Hugging Face's, told apart by the folder's contents.

- Meta's: `params.json` and `consolidated.XX.pth` shards (meta.py); run at the shard count by
  default, or at any model-parallel size that divides the heads.
- Hugging Face's: `config.json` and safetensors files (huggingface.py); any model-parallel size
  that divides the heads.

Either way each rank reads only its slices (sources.py). Every command that loads a LLaMA takes
the `LlamaSettings` flags; `LlamaSettings.open()` reads what the folder is, once, without loading
weights, and the `LlamaCheckpoint` it gives is passed down; `load_llama` builds this rank's
frozen model from it. (Our own training checkpoints are in runs.py.) Every file is untrusted:
`torch.load(..., weights_only=True)`, safetensors, strict key and shape checks, one-line errors.
"""

import glob
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple, Union

import torch
from fairscale.nn.model_parallel import initialize as fs_init

from ..config import Config, setting
from ..distributed import check_model_parallel
from ..errors import UserError
from . import huggingface
from .meta import list_shards, meta_context_length, read_params
from .model import ModelArgs, Transformer, skip_weight_init
from .params import check_architecture
from .quantize import MODES as QUANTIZE_MODES
from .quantize import plan as quantize_plan
from .sources import FLOAT_DTYPES, HFSafetensors, MetaShards, WeightSource, check_state_dict
from .tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer_path

META, HUGGING_FACE = "meta", "hugging face"



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
    weight_map: Optional[Dict[str, str]] = field(default=None, repr=False)  # Hugging Face: tensor -> file
    _source: Optional[WeightSource] = field(default=None, repr=False, compare=False)

    def source(self) -> WeightSource:
        """The weights (memory-mapped; opened on first use, then kept until `release`)."""
        if self._source is None:
            self._source = (MetaShards(self.params, self.files, self.args) if self.format == META
                            else HFSafetensors(self.folder, self.args, self.tied, self.weight_map))
        return self._source

    def release(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def model_parallel_size(self, requested: int = 0, flag: str = "--model_parallel") -> int:
        """The model-parallel size a run uses: `requested`, or by default Meta's shard count (a
        Hugging Face folder: 1). It must divide the heads and the vocabulary."""
        mp = requested or (len(self.files) if self.format == META else 1)
        check_model_parallel(mp, self.args.n_heads, self.args.kv_heads, flag)
        vocab = self.vocab_size()
        if vocab % mp:
            raise UserError(f"{flag} {mp} must divide the vocabulary of {vocab} tokens")
        return mp

    def vocab_size(self) -> int:
        """The vocabulary of the weights (Meta's params.json often says -1: it comes from shard
        0's embedding shape, memory-mapped)."""
        if self.format == HUGGING_FACE or self.args.vocab_size > 0:
            return self.args.vocab_size
        return self.source().args.vocab_size

    def tokenizer_file(self, tokenizer_path: Optional[str] = None) -> str:
        return resolve_tokenizer_path(tokenizer_path, self.folder)

    def architecture(self) -> tuple:
        """What a trained projection depends on: two checkpoints with the same architecture
        are the same LLaMA to it (formats and shard counts aside)."""
        a = self.args
        return a.dim, a.n_layers, a.n_heads, a.kv_heads, self.vocab_size()

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
        check_architecture(args, path)
        return LlamaCheckpoint(ckpt_dir, META, params, args, list_shards(ckpt_dir), meta_context_length(params, path))
    if os.path.isfile(os.path.join(ckpt_dir, "config.json")):
        path = os.path.join(ckpt_dir, "config.json")
        config = huggingface.read_config(ckpt_dir)
        args = huggingface.model_args(config, path)
        check_architecture(args, path)
        files = huggingface.weight_files(ckpt_dir)
        tied = bool(config.get("tie_word_embeddings", False)) and "lm_head.weight" not in files
        context = config.get("max_position_embeddings") or ModelArgs.max_seq_len
        return LlamaCheckpoint(ckpt_dir, HUGGING_FACE, config, args, sorted(set(files.values())), context, tied,
                               "config.json", files)
    raise UserError(f"{ckpt_dir} holds neither params.json (Meta's layout, with consolidated.XX.pth) nor config.json "
                    f"(a Hugging Face folder, with safetensors): pass the folder of the weights as --ckpt_dir")


def load_llama(ckpt: Union[LlamaCheckpoint, str], tokenizer_path: Optional[str] = None, max_seq_len: int = 512,
               device="cpu", dtype=torch.float32, quantize: str = "none") -> Tuple[Transformer, Tokenizer]:
    """This model-parallel rank's frozen LLaMA, on `device` in `dtype`, and the tokenizer
    (`tokenizer_path`, or the one that came with the checkpoint). `ckpt`: the opened checkpoint
    (a folder is opened here, for scripts). `quantize` (quantize.MODES): the blocks' linear
    layers are quantized one tensor at a time as they are read (the rest stays in `dtype`).

    fairscale's model parallelism must be initialised (distributed.setup); any size that
    divides the heads and the vocabulary loads, from either format.
    """
    if isinstance(ckpt, str):
        ckpt = open_checkpoint(ckpt)
    mp, rank = fs_init.get_model_parallel_world_size(), fs_init.get_model_parallel_rank()
    ckpt.model_parallel_size(mp, "model-parallel size")
    tokenizer = load_tokenizer(ckpt.tokenizer_file(tokenizer_path))
    source = ckpt.source()
    args = source.args
    if tokenizer.n_words != args.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.path} has {tokenizer.n_words} words but the checkpoint in {ckpt.folder} "
            f"has {args.vocab_size}: pass the tokenizer that came with these weights"
        )
    args = replace(args, max_seq_len=max_seq_len)
    # One tensor for the embedding and the output layer when both are cut alike.
    share = source.tied and (mp == 1 or args.embedding_split == "vocab")
    with skip_weight_init(), torch.device("meta"):
        model = Transformer(args)
    how = quantize_plan(quantize, device, dtype)
    # This rank's slices, one at a time; a layer the plan quantizes is quantized as soon as it is
    # read (only a placeholder of its shape is kept for the checks), so at most one
    # full-precision slice of it exists at any time.
    layers, quantized, sd = dict(model.named_modules()), {}, {}
    names = source.names() + (["output.weight"] if source.tied and not share else [])
    for name in names:
        t = source.slice(name, mp, rank)
        module = name[:-len(".weight")]
        if how.layer_mode(name) and module in layers \
                and t.shape == layers[module].weight.shape and t.dtype in FLOAT_DTYPES:
            quantized[module] = how.layer(layers[module], name, t)
            t = torch.empty(t.shape, dtype=t.dtype, device="meta")
        sd[name] = t
    check_state_dict(sd, args, mp, source.where, share, ckpt.described_by)
    weights = {k: v.to(device=device, dtype=dtype) for k, v in sd.items() if k[:-len(".weight")] not in quantized}
    del sd
    ckpt.release()
    if share:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if unexpected or set(missing) != {m + ".weight" for m in quantized}:  # check_state_dict saw them all
        raise RuntimeError(f"weights left unloaded: {sorted(set(missing) - {m + '.weight' for m in quantized})[:3]}")
    by_layer = {layers[module]: q for module, q in quantized.items()}
    model.swap_linears(by_layer.get)  # the meta layers give way to the quantized ones
    if share:  # one tensor, not two Parameters that happen to share storage
        model.output.weight = model.tok_embeddings.weight
    model.requires_grad_(False)
    return model.eval(), tokenizer


@dataclass(kw_only=True)
class LlamaSettings(Config):
    """The flags of every command that loads a LLaMA (a config inherits them); `open()` gives
    the checkpoint, read once and passed down."""

    ckpt_dir: str = setting(help="the LLaMA: Meta's folder (params.json + consolidated.XX.pth) or a Hugging Face folder (config.json + safetensors).")
    tokenizer_path: Optional[str] = setting(None, "tokenizer.model (sentencepiece or Llama 3's tiktoken) or tokenizer.json; default: the one in --ckpt_dir (or beside it).")
    model_parallel: int = setting(0, "model-parallel size (GPUs per copy of the LLaMA); 0: Meta's shard count, or 1 for a Hugging Face folder. Any size that divides the heads loads, from either format.")
    device: str = setting("auto", "auto (CUDA when available, else CPU), cpu or cuda.")
    quantize: str = setting("none", "the frozen LLaMA's block weights: none; int8 (per-row scales) or int4 (a scale and offset per 64 inputs), both multiplied by PyTorch's fused kernels (faster decoding than full precision) and both with an int8 output layer; or nf4 (bitsandbytes NF4, dequantized per product); quantized per rank as they load (docs/quantization.md).")

    def check(self) -> None:
        self.at_least(0, "model_parallel")
        self.one_of("quantize", QUANTIZE_MODES)

    def open(self) -> LlamaCheckpoint:
        """The checkpoint in --ckpt_dir (read on the first call, then the same object)."""
        if "_checkpoint" not in self.__dict__:
            self.__dict__["_checkpoint"] = open_checkpoint(self.ckpt_dir)
        return self.__dict__["_checkpoint"]

    def mp_size(self) -> int:
        return self.open().model_parallel_size(self.model_parallel)
