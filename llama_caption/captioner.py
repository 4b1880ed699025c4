"""Vision features + projection + frozen LLaMA: what a captioner is, its loss, its captions.

A training sequence is [prefix embeddings ; BOS w1 .. wn] and the targets are w1 .. wn EOS:
the prefix, BOS and padding carry the label -100, so the loss counts exactly n+1 positions per
caption. Generation prefills [prefix ; BOS] and decodes with the KV cache.

`CaptionerSpec` is the typed description of a trained captioner (encoder identity and feature
kind, projection kind and sizes, prefix length, caption style); `save_projection` writes it beside
the weights and `load_projection` reads it back. `opening.open_captioner` builds the whole model.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import UserError
from .fileio import atomic_path
from .llama.checkpoint import LlamaCheckpoint, open_checkpoint
from .llama.decoding import Decoding, decode
from .llama.model import Transformer
from .llama.tokenizer import Tokenizer
from .projection import Projection
from .vision import EncoderSpec

IGNORE = -100
PROJECTION_FILE = "projection.safetensors"
# Flags renamed since checkpoints were first written: old name -> new name.
RENAMED_FLAGS = {"feature": "feature_kind"}


@dataclass(frozen=True)
class CaptionStyle:
    """How reference captions are cleaned before training (and generated ones compared)."""

    lowercase: bool = True
    drop_period: bool = True

    def clean(self, text: str) -> str:
        text = " ".join(text.strip().split())
        if self.drop_period:
            text = text.rstrip(" .")
        return text.lower() if self.lowercase else text


@dataclass(frozen=True)
class CaptionerSpec:
    """What a trained captioner is: a description saved with its weights (the *Config classes
    are sets of flags). feature_shape is (D,) for pooled features, (N, W) for patch tokens;
    prefix_len is the number of prefix tokens (N for patch features)."""

    encoder: EncoderSpec
    feature_shape: Tuple[int, ...]
    projection: str
    prefix_len: int
    proj_hidden: int
    llama_dim: int
    style: CaptionStyle = CaptionStyle()
    mapper_width: int = 512  # the transformer mapper's sizes (unused by linear and mlp)
    mapper_layers: int = 4
    # The LLaMA it was trained with (LlamaCheckpoint.architecture: width, layers, heads, key-value
    # heads, vocabulary); None in checkpoints written before it was recorded.
    llama_architecture: Optional[Tuple[int, ...]] = None

    @classmethod
    def build(cls, encoder: EncoderSpec, feature_shape, projection: str, prefix_len: int,
              proj_hidden: Optional[int], llama_dim: int, style: CaptionStyle, mapper_width: int = 512,
              mapper_layers: int = 4) -> "CaptionerSpec":
        """The prefix-length rule: pooled features make `prefix_len` tokens, patch features one
        token per patch (the flag is then unused), except through the transformer mapper, which
        always makes `prefix_len`."""
        shape = tuple(int(s) for s in feature_shape)
        pooled = encoder.feature_kind == "pooled"
        tokens = prefix_len if pooled or projection == "transformer" else shape[0]
        return cls(encoder, shape, projection, tokens, proj_hidden or llama_dim, llama_dim, style, mapper_width,
                   mapper_layers)

    @property
    def pooled(self) -> bool:
        return self.encoder.feature_kind == "pooled"

    def new_projection(self) -> Projection:
        return Projection(self.projection, self.pooled, self.feature_shape[-1], self.llama_dim, self.prefix_len,
                          self.proj_hidden, 1 if self.pooled else self.feature_shape[0], self.mapper_width,
                          self.mapper_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionerSpec":
        arch = d.get("llama_architecture")
        return cls(EncoderSpec(**d["encoder"]), tuple(d["feature_shape"]), d["projection"], int(d["prefix_len"]),
                   int(d["proj_hidden"]), int(d["llama_dim"]), CaptionStyle(**d["style"]),
                   int(d.get("mapper_width", 512)), int(d.get("mapper_layers", 4)),
                   tuple(int(x) for x in arch) if arch else None)

    @classmethod
    def from_training_config(cls, cfg: dict, weights: Dict[str, torch.Tensor]) -> "CaptionerSpec":
        """Checkpoints written before the typed config: the training flags and the weights'
        shapes. Their patch count is not recorded (0 here); `opening.check_encoder` takes the encoder's."""
        kind = cfg.get("feature_kind", cfg.get("feature", "pooled"))
        spec = EncoderSpec(cfg["clip_model"], cfg.get("clip_identity") or cfg["clip_model"], kind,
                           cfg.get("clip_layer", -2) if kind == "patch" else None)
        width = weights["net.0.weight"].shape[1]
        hidden = weights["net.0.weight"].shape[0] if cfg["projection"] == "mlp" else None
        shape = (width,) if kind == "pooled" else (0, width)
        style = CaptionStyle(cfg.get("lowercase", True), cfg.get("drop_period", True))
        llama_dim = cfg.get("llama_dim") or weights["net.2.weight" if cfg["projection"] == "mlp" else "net.0.weight"] \
            .shape[0] // (cfg["prefix_len"] if kind == "pooled" else 1)
        return cls.build(spec, shape, cfg["projection"], cfg["prefix_len"], hidden, llama_dim, style)


def save_projection(path: str, state: Dict[str, torch.Tensor], captioner: CaptionerSpec, flags: dict) -> None:
    """The trainable weights with what they are (CaptionerSpec) and the flags that trained them."""
    meta = {"captioner": json.dumps(captioner.to_dict(), sort_keys=True), "config": json.dumps(flags, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp, metadata=meta)


def load_projection(ckpt: str, flag: str = "--checkpoint") -> Tuple[Dict[str, torch.Tensor], CaptionerSpec, dict]:
    """The weights, CaptionerSpec and training flags of a checkpoint folder (any version)."""
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
        flags = {RENAMED_FLAGS.get(k, k): v for k, v in json.loads(meta["config"]).items()}
        if "captioner" in meta:
            captioner = CaptionerSpec.from_dict(json.loads(meta["captioner"]))
        else:  # written before the typed config
            captioner = CaptionerSpec.from_training_config(flags, weights)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: the stored configuration is unreadable ({type(e).__name__}: {e})") from None
    return weights, captioner, flags


CaptionerConfig = CaptionerSpec  # its name until it was told apart from the flag sets (*Config): old imports


class Captioner(nn.Module):
    def __init__(self, llama: Transformer, tokenizer: Tokenizer, projection: Projection,
                 style: CaptionStyle = CaptionStyle(), decoder=None):
        super().__init__()
        self.llama = llama
        self.tokenizer = tokenizer
        self.projection = projection
        self.style = style
        self.truncated = 0  # captions cut to fit max_seq_len, counted for the report
        self.decoder = decoder  # a static_decode.StaticDecoder for greedy/sampled captions, else generation.generate

    @property
    def prefix_len(self) -> int:
        return self.projection.prefix_len

    @property
    def max_caption_tokens(self) -> int:
        # Inputs are prefix + BOS + n caption tokens; EOS is only a target.
        return self.llama.args.max_seq_len - self.prefix_len - 1

    def longest(self, decoding: Decoding) -> int:
        """The most tokens a caption gets: `decoding`'s max_gen_len within the window the LLaMA
        was opened with. A caption shorter than this ended with the end token."""
        return min(decoding.max_gen_len, self.max_caption_tokens)

    def caption_ids(self, captions: List[str]) -> List[List[int]]:
        out = []
        for c in captions:
            ids = self.tokenizer.encode(self.style.clean(c), bos=False, eos=False)
            if len(ids) > self.max_caption_tokens:
                ids = ids[: self.max_caption_tokens]
                self.truncated += 1
            out.append(ids)
        return out

    def targets(self, ids: List[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Input token ids (B, L) [BOS w1..wn, 0-padded] and labels (B, P+L) aligned with the logits."""
        bos, eos, P = self.tokenizer.bos_id, self.tokenizer.eos_id, self.prefix_len
        L = 1 + max(len(x) for x in ids)
        tokens = torch.zeros(len(ids), L, dtype=torch.long)
        labels = torch.full((len(ids), P + L), IGNORE, dtype=torch.long)
        for i, x in enumerate(ids):
            tokens[i, : len(x) + 1] = torch.tensor([bos] + x)
            # logits at prefix+j predict the input at prefix+j+1: w1..wn, then EOS after wn.
            labels[i, P: P + len(x) + 1] = torch.tensor(x + [eos])
        return tokens, labels

    def loss(self, features: torch.Tensor, ids: List[List[int]]) -> Tuple[torch.Tensor, int]:
        """Summed cross-entropy over the caption and EOS positions of captions tokenized by
        `caption_ids` (n + 1 targets each), and how many targets there are.

        The caller divides by the token count of the whole (global) batch, so data-parallel
        ranks and gradient accumulation give the gradient of one big batch.
        """
        tokens, labels = self.targets(ids)
        dev = self.llama.device
        prefix = self.projection(features.to(dev))
        emb = torch.cat([prefix.to(self.llama.dtype), self.llama.embed(tokens.to(dev))], dim=1)
        labels = labels.to(dev)
        targeted = labels != IGNORE
        logits = self.llama(embeddings=emb, logits_at=targeted)
        return F.cross_entropy(logits, labels[targeted], reduction="sum"), int(targeted.sum())

    def caption_loss(self, features: torch.Tensor, captions: List[str]) -> Tuple[torch.Tensor, int]:
        """`loss` of raw caption strings."""
        return self.loss(features, self.caption_ids(captions))

    @torch.no_grad()
    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """The prefix embeddings (B, P, dim) of a batch of features, on the LLaMA's device."""
        return self.projection(features.to(self.llama.device))

    @torch.no_grad()
    def caption(self, features: torch.Tensor, decoding: Decoding, generator=None) -> List[str]:
        """Captions for a batch of features, decoded as `decoding` says (llama.decoding.decode);
        `generator`: `decoding.generator(rank, device)` when sampling."""
        return [self.tokenizer.decode(x).strip() for x in self.caption_tokens(self.prefix(features), decoding, generator)]

    @torch.no_grad()
    def caption_tokens(self, prefix: torch.Tensor, decoding: Decoding, generator=None) -> List[List[int]]:
        """The caption tokens (each without its end token) of a batch of prefixes: those of one
        captioner, or of several trained over this LLaMA with prefixes of one length (the server's
        mixed batches: opening.caption_parts)."""
        prompts = [[self.tokenizer.bos_id] for _ in range(prefix.shape[0])]
        decoding = replace(decoding, max_gen_len=self.longest(decoding))
        # A continuous decoder (continuous.py) streams images through its slots (OpenedCaptioner.stream);
        # a batch given here is decoded by generation.generate, whose captions it equals.
        batch_decoder = self.decoder if hasattr(self.decoder, "generate") else None
        return decode(self.llama, prompts, decoding, eos_id=self.tokenizer.eos_id, prefix=prefix, decoder=batch_decoder,
                      generator=generator)

    @torch.no_grad()
    def mean_logprob(self, prefix: torch.Tensor, tokens: List[List[int]], ended: List[bool]) -> List[float]:
        """Each caption's mean token log-probability under the model, given its image's prefix:
        over its tokens and, when it `ended` with the end token (not cut at max_gen_len), that
        token too. One teacher-forced forward of the batch."""
        rows, labels = self.targets([list(t) for t in tokens])
        for i, (t, e) in enumerate(zip(tokens, ended)):
            if not e:  # cut at max_gen_len: no end-token target
                labels[i, self.prefix_len + len(t)] = IGNORE
        dev = self.llama.device
        emb = torch.cat([prefix.to(self.llama.dtype), self.llama.embed(rows.to(dev))], dim=1)
        labels = labels.to(dev)
        targeted = labels != IGNORE
        logits = self.llama(embeddings=emb, logits_at=targeted).float()
        picked = torch.log_softmax(logits, dim=-1).gather(1, labels[targeted][:, None])[:, 0]
        counts = targeted.sum(1).tolist()
        out, at = [], 0
        for n in counts:
            out.append(float(picked[at:at + n].mean()) if n else 0.0)  # an empty caption cut at once: no target
            at += n
        return out

    def generate(self, features: torch.Tensor, max_gen_len: int = 30, generator=None, **settings) -> List[str]:
        """`caption` with Decoding(max_gen_len, **settings): the short form for scripts and
        training's greedy captions."""
        return self.caption(features, Decoding(max_gen_len=max_gen_len, **settings), generator)


def check_window(prefix_len: int, text_len: int, llama: LlamaCheckpoint, flag: str) -> int:
    """The tokens a sequence needs (prefix + BOS + text) against the LLaMA's context, read from
    its params.json or config.json before anything is loaded; returns the window."""
    window = prefix_len + 1 + text_len
    if window > llama.context:
        raise UserError(f"{flag} {text_len} with a {prefix_len}-token image prefix needs {window} positions, "
                        f"more than the {llama.context} of the LLaMA in {llama.folder}: lower {flag}")
    return window


def check_same_llama(where: str, recorded_dir: Optional[str], llama: LlamaCheckpoint,
                     recorded: Optional[Tuple[int, ...]] = None) -> None:
    """The LLaMA a projection was trained with against `llama`: another architecture (width,
    layers, heads, key-value heads, vocabulary) is refused, read from what the checkpoint
    recorded (`recorded`: CaptionerSpec.llama_architecture) or, for checkpoints of before, from
    its folder (as its flags recorded it) when that still exists. Two LLaMAs of the same shape
    are not told apart."""
    if recorded is not None:
        if tuple(recorded) != tuple(llama.architecture()):
            names = ("width", "layers", "heads", "key-value heads", "vocabulary")
            diff = next(f"{n} {a} against {b}" for n, a, b in zip(names, recorded, llama.architecture()) if a != b)
            raise UserError(f"{where} was trained with another LLaMA than the one in --ckpt_dir {llama.folder} ({diff}): "
                            f"use the LLaMA it was trained with")
        return
    if not recorded_dir or not os.path.isdir(recorded_dir) or os.path.abspath(recorded_dir) == os.path.abspath(llama.folder):
        return
    if open_checkpoint(recorded_dir).architecture() != llama.architecture():
        raise UserError(f"{where} was trained with the LLaMA in {recorded_dir}, not the one in --ckpt_dir {llama.folder}: "
                        f"use the LLaMA it was trained with")
