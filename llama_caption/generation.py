"""Batched decoding with the KV cache: prefill the whole prompt once, then one token a step.

Prompts of different lengths are left-padded; `key_valid` masks the padding out of attention
and shifts rotary positions so each sequence starts at position 0, exactly as if run alone.
An optional per-sequence embedding prefix (the image) stands before each text prompt.
"""

from typing import List, Optional

import torch

from .model import Transformer


def sample_top_p(probs: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches p."""
    sorted_probs, idx = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before > p, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return torch.gather(idx, -1, choice).squeeze(-1)


def pick_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """(B, vocab) logits to (B,) token ids: argmax when temperature is 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return sample_top_p(torch.softmax(logits.float() / temperature, dim=-1), top_p, generator)


def build_inputs(model: Transformer, prompts: List[List[int]], prefix: Optional[torch.Tensor]):
    """Left-padded input embeddings (B, L, dim) and the mask of real slots (B, L)."""
    bsz = len(prompts)
    p_len = 0 if prefix is None else prefix.shape[1]
    lengths = [p_len + len(t) for t in prompts]
    width = max(lengths)
    dev = model.device
    tokens = torch.zeros(bsz, width, dtype=torch.long, device=dev)
    valid = torch.zeros(bsz, width, dtype=torch.bool, device=dev)
    is_text = torch.zeros(bsz, width, dtype=torch.bool, device=dev)
    for i, t in enumerate(prompts):
        start = width - lengths[i]
        valid[i, start:] = True
        if t:
            tokens[i, width - len(t):] = torch.tensor(t, device=dev)
            is_text[i, width - len(t):] = True
    emb = model.embed(tokens) * is_text[..., None].to(model.dtype)
    if prefix is not None:
        starts = [width - n for n in lengths]
        for i, s in enumerate(starts):
            emb[i, s:s + p_len] = prefix[i].to(emb.dtype)
    return emb, valid


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: List[List[int]],
    *,
    eos_id: int,
    max_gen_len: int,
    prefix: Optional[torch.Tensor] = None,
    temperature: float = 0.0,
    top_p: float = 0.95,
    generator: Optional[torch.Generator] = None,
) -> List[List[int]]:
    """Generate up to `max_gen_len` tokens after each prompt; each list stops before its EOS.

    prompts: token ids per sequence (BOS included by the caller); prefix: (B, P, dim) embeddings
    placed before each prompt, or None. Every model-parallel rank must call this with the same
    arguments and RNG state; the logits are gathered, so all ranks pick the same tokens.
    """
    bsz = len(prompts)
    if prefix is not None and prefix.shape[0] != bsz:
        raise ValueError(f"prefix batch {prefix.shape[0]} != number of prompts {bsz}")
    emb, valid = build_inputs(model, prompts, prefix)
    width = emb.shape[1]
    total = width + max_gen_len
    if total > model.args.max_seq_len:
        raise ValueError(f"prompt ({width}) + max_gen_len ({max_gen_len}) exceeds max_seq_len {model.args.max_seq_len}")
    padded = not bool(valid.all())
    key_valid = torch.cat([valid, torch.ones(bsz, max_gen_len, dtype=torch.bool, device=valid.device)], 1) if padded else None
    cache = model.new_cache(bsz, total)
    logits = model(embeddings=emb, cache=cache, start_pos=0, key_valid=key_valid, last_only=True)
    out = torch.zeros(bsz, max_gen_len, dtype=torch.long, device=emb.device)
    done = torch.zeros(bsz, dtype=torch.bool, device=emb.device)
    steps = 0
    for step in range(max_gen_len):
        tok = pick_next(logits[:, -1], temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)
        out[:, step] = tok
        steps = step + 1
        done |= tok == eos_id
        if step + 1 == max_gen_len or bool(done.all()):
            break
        logits = model(tok[:, None], cache=cache, start_pos=width + step, key_valid=key_valid, last_only=True)
    return [cut_at_eos(row, eos_id) for row in out[:, :steps].tolist()]


def cut_at_eos(ids: List[int], eos_id: int) -> List[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def greedy_no_cache(
    model: Transformer,
    prompts: List[List[int]],
    *,
    eos_id: int,
    max_gen_len: int,
    prefix: Optional[torch.Tensor] = None,
) -> List[List[int]]:
    """Reference decoder: one sequence at a time, the whole sequence re-run at every step.

    Slow on purpose (it is the approach the KV cache replaces); tests and benchmarks compare
    against it.
    """
    results = []
    for i, prompt in enumerate(prompts):
        generated: List[int] = []
        for _ in range(max_gen_len):
            ids = torch.tensor([prompt + generated], dtype=torch.long, device=model.device)
            emb = model.embed(ids)
            if prefix is not None:
                emb = torch.cat([prefix[i:i + 1].to(emb.dtype), emb], dim=1)
            tok = int(model(embeddings=emb, last_only=True)[0, -1].argmax())
            if tok == eos_id:
                break
            generated.append(tok)
        results.append(generated)
    return results
