"""Vision features + projection + frozen LLaMA: the captioning loss and caption generation.

A training sequence is [prefix embeddings ; BOS w1 .. wn] and the targets are w1 .. wn EOS:
the prefix, BOS and padding carry the label -100, so the loss counts exactly n+1 positions per
caption. Generation prefills [prefix ; BOS] and decodes with the KV cache.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .generation import beam_search, generate
from .model import Transformer
from .projection import Projection
from .tokenizer import Tokenizer

IGNORE = -100


@dataclass
class CaptionStyle:
    """How reference captions are cleaned before training (and generated ones compared)."""

    lowercase: bool = True
    drop_period: bool = True

    def clean(self, text: str) -> str:
        text = " ".join(text.strip().split())
        if self.drop_period:
            text = text.rstrip(" .")
        return text.lower() if self.lowercase else text


class Captioner(nn.Module):
    def __init__(self, llama: Transformer, tokenizer: Tokenizer, projection: Projection,
                 style: Optional[CaptionStyle] = None):
        super().__init__()
        self.llama = llama
        self.tokenizer = tokenizer
        self.projection = projection
        self.style = style or CaptionStyle()
        self.truncated = 0  # captions cut to fit max_seq_len, counted for the report

    @property
    def prefix_len(self) -> int:
        return self.projection.prefix_len

    @property
    def max_caption_tokens(self) -> int:
        # Inputs are prefix + BOS + n caption tokens; EOS is only a target.
        return self.llama.args.max_seq_len - self.prefix_len - 1

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

    def loss_terms(self, features: torch.Tensor, captions: List[str]) -> Tuple[torch.Tensor, int]:
        """Summed cross-entropy over the caption and EOS positions, and how many there are.

        The caller divides by the token count of the whole (global) batch, so data-parallel
        ranks and gradient accumulation give the gradient of one big batch.
        """
        return self.loss_from_ids(features, self.caption_ids(captions))

    def loss_from_ids(self, features: torch.Tensor, ids: List[List[int]]) -> Tuple[torch.Tensor, int]:
        """`loss_terms` for captions already tokenized by `caption_ids` (n + 1 targets each)."""
        tokens, labels = self.targets(ids)
        dev = self.llama.device
        prefix = self.projection(features.to(dev))
        emb = torch.cat([prefix.to(self.llama.dtype), self.llama.embed(tokens.to(dev))], dim=1)
        labels = labels.to(dev)
        keep = labels != IGNORE
        logits = self.llama(embeddings=emb, keep=keep)
        loss = F.cross_entropy(logits, labels[keep], reduction="sum")
        return loss, int(keep.sum())

    @torch.no_grad()
    def generate(self, features: torch.Tensor, max_gen_len: int = 30, temperature: float = 0.0,
                 top_p: float = 0.95, generator=None, num_beams: int = 1, length_penalty: float = 1.0) -> List[str]:
        """Captions for a batch of features: greedy (temperature 0), top-p sampling, or beam search."""
        prefix = self.projection(features.to(self.llama.device))
        prompts = [[self.tokenizer.bos_id] for _ in range(prefix.shape[0])]
        max_gen_len = min(max_gen_len, self.llama.args.max_seq_len - self.prefix_len - 1)
        if num_beams > 1:
            out = beam_search(self.llama, prompts, prefix=prefix, eos_id=self.tokenizer.eos_id,
                              max_gen_len=max_gen_len, num_beams=num_beams, length_penalty=length_penalty)
        else:
            out = generate(self.llama, prompts, prefix=prefix, eos_id=self.tokenizer.eos_id,
                           max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, generator=generator)
        return [self.tokenizer.decode(x).strip() for x in out]


def load_captioner(checkpoint: str, ckpt_dir: str, tokenizer_path: str, device, dtype=torch.float32,
                   max_gen_len: int = 30, max_batch_size: int = 32, clip_model: Optional[str] = None,
                   need_encoder: bool = True):
    """A trained captioner from a training checkpoint, the frozen LLaMA and CLIP.

    The CLIP model, feature kind, projection and prefix length come from the checkpoint's config
    (`clip_model` overrides the path of the same CLIP file moved elsewhere; its identity must
    match). Returns (captioner, encoder or None, config).
    """
    from .checkpoint import find_checkpoint, load_llama, load_projection_checkpoint
    from .errors import UserError
    from .vision import ClipEncoder

    ckpt = find_checkpoint(checkpoint)
    weights, cfg = load_projection_checkpoint(ckpt)
    for key in ("clip_model", "feature", "projection", "prefix_len"):
        if key not in cfg:
            raise UserError(f"{ckpt}: the stored config lacks {key!r}; was it written by captioning_training.py?")
    clip_name = clip_model or cfg["clip_model"]
    encoder = ClipEncoder(clip_name, device, cfg["feature"], cfg.get("clip_layer", -2)) if need_encoder else None
    shape = tuple(encoder.feature_shape) if encoder else None
    if encoder is not None and cfg.get("clip_identity") not in (None, encoder.identity):
        raise UserError(f"--checkpoint {ckpt} was trained with CLIP {cfg['clip_model']} ({cfg['clip_identity'][:23]}) "
                        f"but {clip_name} is another model ({encoder.identity[:23]}): use the CLIP model it was trained with")
    if encoder is not None:
        trained_in = weights["net.0.weight"].shape[1]
        if shape[-1] != trained_in:
            raise UserError(f"--checkpoint {ckpt} was trained on CLIP features of width {trained_in} "
                            f"({cfg['clip_model']}) but {clip_name} gives {shape[-1]}: use the CLIP model it was trained with")
    if shape is None:
        shape = (weights["net.0.weight"].shape[1],) if cfg["feature"] == "pooled" else None
    prefix_len = cfg["prefix_len"] if cfg["feature"] == "pooled" else shape[0]
    llama, tokenizer = load_llama(ckpt_dir, tokenizer_path, prefix_len + 1 + max_gen_len, max_batch_size,
                                  device=device, dtype=dtype)
    out_w = weights["net.2.weight" if cfg["projection"] == "mlp" else "net.0.weight"]
    per_token = out_w.shape[0] // (prefix_len if cfg["feature"] == "pooled" else 1)
    if per_token != llama.args.dim:
        raise UserError(f"--checkpoint {ckpt} projects to LLaMA width {per_token} but {ckpt_dir} has width "
                        f"{llama.args.dim}: use the LLaMA it was trained with")
    projection = Projection(cfg["projection"], cfg["feature"], shape, llama.args.dim, cfg["prefix_len"],
                            cfg.get("proj_hidden"))
    try:
        projection.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(f"{ckpt}: projection weights do not fit the stored config ({str(e).splitlines()[0]})") from None
    projection.to(device).eval()
    style = CaptionStyle(cfg.get("lowercase", True), cfg.get("drop_period", True))
    return Captioner(llama, tokenizer, projection, style), encoder, cfg
