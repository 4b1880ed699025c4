"""Stand-in pretrained models for the offline demo and the tests, in the real file formats.

- LLaMA: our Transformer, pretrained as a language model on captions, written as Meta's
  params.json + consolidated.00.pth, with a sentencepiece tokenizer.model trained on the same text.
- CLIP: the `clip` package's own CLIP class, trained contrastively on image-caption pairs and
  saved as a TorchScript file that clip.load reads.
"""

import os
from typing import Dict, List

import torch
import torch.nn.functional as F

from ...llama.model import ModelArgs, Transformer
from ..testing import random_state_dict, train_tokenizer, write_meta_checkpoint
from ...llama.tokenizer import Tokenizer
from ...vision import import_clip


def pretrain_llama(groups: List[List[str]], tokenizer: Tokenizer, params: dict, steps: int = 300,
                   batch_size: int = 64, lr: float = 3e-3, seed: int = 0, per_sequence: int = 2,
                   log=None) -> Dict[str, torch.Tensor]:
    """Train a small LLaMA (model-parallel size 1 must be initialised) as a language model;
    return its full state dict in Meta's layout.

    `groups` are texts that describe one thing (the captions of one image). Each training
    sequence is two texts of a group, one after the other: "<s> a </s><s> b </s>". Besides the
    language, the model so learns to carry what an earlier part of its context says into what
    it writes next, the in-context skill that lets a large LLaMA read an image prefix; a tiny
    model trained on single captions never learns to look back and ignores the prefix.
    """
    args = ModelArgs.from_params(params, vocab_size=tokenizer.n_words, max_seq_len=128)
    g = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=seed), strict=True)
    model.train()
    encoded = [[tokenizer.encode(t, bos=True, eos=True) for t in grp] for grp in groups if grp]
    seqs = []
    for grp in encoded:
        for i in range(len(grp)):
            seqs.append(sum((grp[(i + j) % len(grp)] for j in range(per_sequence)), [])[: args.max_seq_len])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        idx = torch.randint(0, len(seqs), (batch_size,), generator=g).tolist()
        batch = [seqs[i] for i in idx]
        L = max(len(s) for s in batch)
        x = torch.zeros(batch_size, L - 1, dtype=torch.long)
        y = torch.full((batch_size, L - 1), -100, dtype=torch.long)
        for i, s in enumerate(batch):
            x[i, : len(s) - 1] = torch.tensor(s[:-1])
            y[i, : len(s) - 1] = torch.tensor(s[1:])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  LLaMA stand-in step {step + 1}/{steps}: loss {loss.item():.3f}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_llama(out_dir: str, groups: List[List[str]], params: dict, vocab_size: int = 256, steps: int = 300,
                seed: int = 0, lr: float = 3e-3, per_sequence: int = 2, log=None) -> Dict[str, str]:
    """Tokenizer + pretrained stand-in LLaMA in Meta's layout: out_dir/tokenizer.model and
    out_dir/llama/{params.json, consolidated.00.pth}. `groups`: the captions of each image."""
    tok = train_tokenizer([t for grp in groups for t in grp], vocab_size, os.path.join(out_dir, "tokenizer.model"))
    sd = pretrain_llama(groups, tok, params, steps=steps, lr=lr, seed=seed, per_sequence=per_sequence, log=log)
    write_meta_checkpoint(os.path.join(out_dir, "llama"), dict(params, vocab_size=-1), sd)
    return {"tokenizer": tok.path, "ckpt_dir": os.path.join(out_dir, "llama")}


def clip_tokenize(texts: List[str], context_length: int) -> torch.Tensor:
    return import_clip().tokenize(texts, context_length=context_length, truncate=True)


def train_clip(images: torch.Tensor, captions: List[List[str]], steps: int = 300, batch_size: int = 256,
               lr: float = 1e-3, width: int = 128, layers: int = 4, patch: int = 4, embed_dim: int = 128,
               context_length: int = 32, seed: int = 0, log=None):
    """Train the `clip` package's CLIP class contrastively on (image, caption) pairs.

    images: preprocessed (N, 3, R, R); captions: the captions of each image (one is drawn per
    image and step). Pairs whose captions are the same text count as positives of each other.
    Returns the trained clip.model.CLIP (eval mode).

    Two things make a step cheaper without changing what is learnt: the text context is cut to
    the longest caption (at most `context_length` tokens; CLIP's text transformer is causal and
    reads the end-of-text position, so the padding after it changes nothing), and only the rows
    of the token embedding that the captions use are trained (a compact copy, written back at
    the end) instead of an update of all 49,408 rows every step.
    """
    clip = import_clip()
    texts = sorted({c for caps in captions for c in caps})
    text_ids = {t: i for i, t in enumerate(texts)}
    tokens = clip_tokenize(texts, context_length)
    context_length = int((tokens != 0).sum(1).max())
    tokens = tokens[:, :context_length].contiguous()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = clip.model.CLIP(embed_dim=embed_dim, image_resolution=images.shape[-1], vision_layers=layers,
                            vision_width=width, vision_patch_size=patch, context_length=context_length,
                            vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2).float()
    # The used token ids in order, so that end-of-text (49407, the largest id) stays the largest
    # compact id: encode_text finds it by argmax.
    used = torch.unique(tokens)
    full_embedding = model.token_embedding
    model.token_embedding = torch.nn.Embedding.from_pretrained(full_embedding.weight.detach()[used].clone(),
                                                               freeze=False)
    tokens = torch.searchsorted(used, tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        choice = [captions[i][int(torch.randint(0, len(captions[i]), (1,), generator=g))] for i in idx.tolist()]
        tid = torch.tensor([text_ids[c] for c in choice])
        img = model.encode_image(images[idx])
        txt = model.encode_text(tokens[tid])
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        # Soft targets: a caption also matches every image that drew the same text.
        same = (tid[:, None] == tid[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  CLIP stand-in step {step + 1}/{steps}: contrastive loss {loss.item():.3f}")
    with torch.no_grad():
        full_embedding.weight[used] = model.token_embedding.weight
    model.token_embedding = full_embedding
    return model.eval()


@torch.no_grad()
def text_embeddings(model, texts: List[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(clip_tokenize(texts, model.context_length)).float(), dim=-1)
