"""Where a rank's weights come from: one source per checkpoint format, each giving model-parallel
rank `rank` of `mp` its piece of a weight, in Meta's names and layout, without reading the rest.

Loading (`checkpoint.load_llama`), resharding and converting (`convert.py`) are loops over
`source.slice(name, mp, rank)`; a source reads memory-mapped files, so a rank touches its share
of the checkpoint plus at most one whole tensor (when its piece spans several stored shards).

- `MetaShards`: `consolidated.XX.pth` files at any stored model-parallel size; a rank of another
  size takes the parts of the stored shards that cover its piece.
- `HFSafetensors`: a Hugging Face folder's safetensors, sliced by safetensors itself; q/k rows
  are put back in Meta's rotary order.

A checkpoint with tied embeddings (no output weight) serves `output.weight` from the token
embedding, cut along the vocabulary as the output layer is.
"""

import os
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import UserError
from .huggingface import INDEX_FILE, SINGLE_FILE, hf_name, unpermute_rows, weight_files
from .meta import IGNORED_KEYS, load_shard, meta_vocab
from .model import ModelArgs, param_shapes, shard_dim


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
        if sd[k].dtype not in FLOAT_DTYPES:
            raise UserError(f"{path}: {k} is {str(sd[k].dtype).replace('torch.', '')}: only fp32, fp16 and bf16 weights "
                            f"are read (a quantized checkpoint?)")
        if tuple(sd[k].shape) != shape:
            raise UserError(
                f"{path}: {k} has shape {tuple(sd[k].shape)}, {described_by} with model-parallel size {mp} "
                f"implies {shape}: wrong params.json, or a shard of another model"
            )


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SAFETENSORS_FLOATS = ("F32", "F16", "BF16")


class WeightSource:
    """The weights of one checkpoint. `args` is the full architecture (vocabulary and the
    embedding's stored split filled in); `tied`: no output weight, the output layer is the
    embedding; `where`: the file or folder messages name."""

    args: ModelArgs
    tied: bool
    where: str

    def names(self, with_tied_output: bool = False) -> List[str]:
        """Meta's names of the weights, in order (a tied output layer only when asked for)."""
        return [n for n in param_shapes(self.args) if with_tied_output or not (n == "output.weight" and self.tied)]

    def slice(self, name: str, mp: int, rank: int, split: Optional[str] = None) -> torch.Tensor:
        """Rank `rank`'s piece of weight `name` when the model is cut into `mp` pieces, the
        embedding along `split` (default: the checkpoint's own)."""
        raise NotImplementedError

    def rank_state(self, mp: int, rank: int) -> Dict[str, torch.Tensor]:
        return {name: self.slice(name, mp, rank) for name in self.names()}

    def close(self) -> None:
        """Let go of the mapped files."""


def _target_dim(name: str, mp: int, split: str) -> Optional[int]:
    return shard_dim(name, split) if mp > 1 else None


def _piece(t_size: int, mp: int, rank: int, name: str, where: str, d: int):
    if t_size % mp:
        raise UserError(f"{where}: {name} has {t_size} rows/columns along dim {d}, which cannot be split into {mp} "
                        f"model-parallel pieces: pick a model-parallel size that divides it")
    n = t_size // mp
    return rank * n, n


class MetaShards(WeightSource):
    """`consolidated.XX.pth` shards (memory-mapped), served at any model-parallel size."""

    def __init__(self, params: dict, files: List[str], args: ModelArgs):
        self.files, self.params = files, params
        self.shards = [{k: v for k, v in load_shard(p).items() if k not in IGNORED_KEYS} for p in files]
        first = self.shards[0]
        for path, sd in zip(files[1:], self.shards[1:]):
            if set(sd) != set(first):
                raise UserError(f"{path} has other keys than {files[0]}: the shards are not of one model")
        emb = first.get("tok_embeddings.weight")
        if emb is None:
            raise UserError(f"{files[0]} does not match params.json: missing keys ['tok_embeddings.weight']")
        vocab, self.stored_split = meta_vocab(params, tuple(emb.shape), len(files), files[0])
        self.args = replace(args, vocab_size=vocab, embedding_split=self.stored_split)
        self.tied = "output.weight" not in first
        self.where = files[0]
        for path, sd in zip(files, self.shards):  # every stored shard as it should be, before any is cut
            check_state_dict(sd, self.args, len(files), path, self.tied)

    def stored(self, name: str) -> List[torch.Tensor]:
        if name not in self.shards[0]:
            raise UserError(f"{self.files[0]} does not match params.json: missing keys [{name!r}]")
        return [sd[name] for sd in self.shards]

    def slice(self, name: str, mp: int, rank: int, split: Optional[str] = None) -> torch.Tensor:
        split = split or self.stored_split
        if self.tied and name == "output.weight":  # the output layer is cut along the vocabulary
            return self.slice("tok_embeddings.weight", mp, rank, "vocab")
        parts = self.stored(name)
        have = shard_dim(name, self.stored_split) if len(parts) > 1 else None
        want = _target_dim(name, mp, split)
        if have == want and (want is None or len(parts) == mp):
            if want is None and len(parts) > 1 and len(parts) != mp:
                return parts[0].clone()  # a replicated weight kept alone keeps no merged shard mapped
            return parts[0] if want is None else parts[rank]  # as stored: mapped, nothing copied
        if have != want or have is None:
            whole = parts[0] if have is None else torch.cat(parts, dim=have)
            if want is None:
                return whole
            start, n = _piece(whole.shape[want], mp, rank, name, self.where, want)
            return whole.narrow(want, start, n).contiguous()
        return self._span(parts, want, mp, rank, name)

    def _span(self, parts: List[torch.Tensor], d: int, mp: int, rank: int, name: str) -> torch.Tensor:
        """The piece along `d`, which the stored shards also split: only the parts it covers."""
        start, n = _piece(sum(p.shape[d] for p in parts), mp, rank, name, self.where, d)
        pieces, offset = [], 0
        for p in parts:
            lo, hi = max(start, offset), min(start + n, offset + p.shape[d])
            if lo < hi:
                pieces.append(p.narrow(d, lo - offset, hi - lo))
            offset += p.shape[d]
        return torch.cat(pieces, dim=d) if len(pieces) > 1 else pieces[0].contiguous()

    def close(self) -> None:
        self.shards = []


class HFSafetensors(WeightSource):
    """A Hugging Face folder's safetensors files, read slice by slice."""

    def __init__(self, folder: str, args: ModelArgs, tied: bool, files: Optional[Dict[str, str]] = None):
        self.folder, self.args, self.tied = folder, args, tied
        self.files = files if files is not None else weight_files(folder)
        self.handles = {}
        index = os.path.join(folder, INDEX_FILE)
        self.where = index if os.path.isfile(index) else os.path.join(folder, SINGLE_FILE)
        self.check_headers()

    def check_headers(self) -> None:
        """Every tensor of the files, from their headers (nothing is read): where the index says,
        one we read (no quantization scales or extras), of a float dtype, of the shape
        config.json implies. Before anything is loaded or written."""
        expected = {hf_name(n): s for n, s in param_shapes(self.args).items() if not (self.tied and n == "output.weight")}
        seen = set()
        for path in sorted(set(self.files.values())):
            handle = self.handle(path)
            for name in handle.keys():
                if name.endswith("rotary_emb.inv_freq"):  # a buffer older conversions saved; recomputed
                    continue
                if name not in expected:
                    raise UserError(f"{path} holds {name}, which a LlamaForCausalLM of config.json does not have "
                                    f"(quantization scales, or another model's weights): not read")
                if self.files.get(name) != path:
                    raise UserError(f"{self.where} puts {name} in {os.path.basename(str(self.files.get(name)))} but it is in "
                                    f"{os.path.basename(path)}: the index does not match the files")
                view = handle.get_slice(name)
                if view.get_dtype() not in SAFETENSORS_FLOATS:
                    raise UserError(f"{path}: {name} is {view.get_dtype()}: only F32, F16 and BF16 weights are read "
                                    f"(a quantized checkpoint?)")
                if tuple(view.get_shape()) != tuple(expected[name]):
                    raise UserError(f"{path}: {name} has shape {tuple(view.get_shape())}, config.json implies "
                                    f"{tuple(expected[name])}: wrong config.json, or a tensor of another model")
                seen.add(name)
        for name, path in self.files.items():
            if name in expected and name not in seen:
                raise UserError(f"{self.where} puts {name} in {os.path.basename(path)}, which does not hold it")

    def handle(self, path: str):
        from safetensors import safe_open

        if path not in self.handles:
            try:
                self.handles[path] = safe_open(path, "pt")
            except Exception as e:  # safetensors raises its own error type on a corrupt header
                raise UserError(f"cannot read {path} as safetensors ({str(e).splitlines()[0][:200]})") from None
        return self.handles[path]

    def slice(self, name: str, mp: int, rank: int, split: Optional[str] = None) -> torch.Tensor:
        split = split or self.args.embedding_split
        tied_output = self.tied and name == "output.weight"
        source = hf_name("tok_embeddings.weight" if tied_output else name)
        if source not in self.files:
            raise UserError(f"{self.where} has no tensor {source}: is this a complete LlamaForCausalLM checkpoint?")
        path = self.files[source]
        view = self.handle(path).get_slice(source)
        d = _target_dim(name, mp, "vocab" if tied_output else split)
        if d is None:
            t = view[:]
        else:
            start, n = _piece(view.get_shape()[d], mp, rank, source, path, d)
            # A column slice is a strided view of the mapped file: copy it, so the weight is
            # contiguous for the matrix products.
            t = view[start:start + n] if d == 0 else view[:, start:start + n].contiguous()
        leaf = name.split(".")[-2]
        if leaf in ("wq", "wk"):
            heads = self.args.n_heads if leaf == "wq" else self.args.kv_heads
            t = unpermute_rows(t, heads // mp)
        return t

    def close(self) -> None:
        self.handles.clear()
