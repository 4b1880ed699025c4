"""Stand-in pretrained models for the offline demo and the tests, in the real file formats.

- LLaMA: our Transformer, pretrained as a language model on captions, written as Meta's
  params.json + consolidated.00.pth, with a sentencepiece tokenizer.model trained on the same text.
- CLIP: the `clip` package's own CLIP class, trained contrastively on image-caption pairs and
  saved as a TorchScript file that clip.load reads.
"""

import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..checkpoint import random_state_dict, write_meta_checkpoint
from ..model import ModelArgs, Transformer
from ..tokenizer import Tokenizer, train_tokenizer


def pretrain_llama(groups: List[List[str]], tokenizer: Tokenizer, params: dict, steps: int = 300,
                   batch_size: int = 64, lr: float = 3e-3, seed: int = 0, log=None) -> Dict[str, torch.Tensor]:
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
            j = (i + 1) % len(grp)
            seqs.append((grp[i] + grp[j])[: args.max_seq_len])
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
                seed: int = 0, log=None) -> Dict[str, str]:
    """Tokenizer + pretrained stand-in LLaMA in Meta's layout: out_dir/tokenizer.model and
    out_dir/llama/{params.json, consolidated.00.pth}. `groups`: the captions of each image."""
    tok = train_tokenizer([t for grp in groups for t in grp], vocab_size, os.path.join(out_dir, "tokenizer.model"))
    sd = pretrain_llama(groups, tok, params, steps=steps, seed=seed, log=log)
    write_meta_checkpoint(os.path.join(out_dir, "llama"), dict(params, vocab_size=-1), sd)
    return {"tokenizer": tok.path, "ckpt_dir": os.path.join(out_dir, "llama")}
