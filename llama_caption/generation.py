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


def prepare(model: Transformer, prompts: List[List[int]], prefix: Optional[torch.Tensor], max_gen_len: int,
            copies: int = 1):
    """Prefill inputs (each prompt `copies` times), the padding mask of the whole window (None
    without padding) and a KV cache sized for prompt + max_gen_len."""
    if prefix is not None and prefix.shape[0] != len(prompts):
        raise ValueError(f"prefix batch {prefix.shape[0]} != number of prompts {len(prompts)}")
    emb, valid = build_inputs(model, prompts, prefix)
    if copies > 1:
        emb, valid = emb.repeat_interleave(copies, 0), valid.repeat_interleave(copies, 0)
    rows, width = valid.shape
    if width + max_gen_len > model.args.max_seq_len:
        raise ValueError(f"prompt ({width}) + max_gen_len ({max_gen_len}) exceeds max_seq_len {model.args.max_seq_len}")
    key_valid = None
    if not bool(valid.all()):
        key_valid = torch.cat([valid, torch.ones(rows, max_gen_len, dtype=torch.bool, device=valid.device)], 1)
    return emb, key_valid, model.new_cache(rows, width + max_gen_len)


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
    emb, key_valid, cache = prepare(model, prompts, prefix, max_gen_len)
    width = emb.shape[1]
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
        # Asking whether all sequences ended waits for the device: do it every few steps only.
        if step + 1 == max_gen_len or (step % 4 == 3 and bool(done.all())):
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


def sequence_score(logprob_sum: float, length: int, length_penalty: float) -> float:
    """Length-normalised log-probability: sum / length**alpha (alpha 0: the plain sum)."""
    return logprob_sum / (max(length, 1) ** length_penalty)


@torch.no_grad()
def beam_search(
    model: Transformer,
    prompts: List[List[int]],
    *,
    eos_id: int,
    max_gen_len: int,
    num_beams: int,
    prefix: Optional[torch.Tensor] = None,
    length_penalty: float = 1.0,
) -> List[List[int]]:
    """Beam search with the KV cache; returns the best hypothesis of each prompt (without EOS).

    Hypotheses are ranked by `sequence_score` of their tokens' log-probabilities, EOS included
    when they have ended. Only an EOS ranked among the top `num_beams` candidates ends a
    hypothesis, so one beam is exactly greedy decoding. A prompt is finished when it holds
    `num_beams` ended hypotheses and no live beam can still rank above the worst of them.
    """
    k = num_beams
    bsz = len(prompts)
    # Every prompt's k beams are rows b*k .. b*k+k-1 of one batch of bsz*k sequences.
    emb, key_valid, cache = prepare(model, prompts, prefix, max_gen_len, copies=k)
    width, dev = emb.shape[1], emb.device
    logits = model(embeddings=emb, cache=cache, key_valid=key_valid, last_only=True)[:, -1]
    # Beams of one prompt start identical: only the first may expand at step 0.
    scores = torch.zeros(bsz, k, dtype=torch.float64, device=dev)
    scores[:, 1:] = float("-inf")
    tokens = torch.zeros(bsz, k, 0, dtype=torch.long, device=dev)
    finished: List[List[tuple]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    vocab = logits.shape[-1]
    for step in range(max_gen_len):
        logp = torch.log_softmax(logits.double(), dim=-1).view(bsz, k, vocab)
        cand = (scores[..., None] + logp).view(bsz, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=-1)
        beam_src, tok = top_idx // vocab, top_idx % vocab
        new_scores = torch.full((bsz, k), float("-inf"), dtype=torch.float64, device=dev)
        new_src = torch.zeros(bsz, k, dtype=torch.long, device=dev)
        new_tok = torch.full((bsz, k), eos_id, dtype=torch.long, device=dev)
        for b in range(bsz):
            if done[b]:
                continue
            live = 0
            for rank in range(2 * k):
                s, src, t = float(top_scores[b, rank]), int(beam_src[b, rank]), int(tok[b, rank])
                if s == float("-inf"):
                    break
                if t == eos_id:
                    if rank < k:
                        hyp = tokens[b, src].tolist()
                        finished[b].append((sequence_score(s, len(hyp) + 1, length_penalty), hyp))
                    continue
                new_scores[b, live], new_src[b, live], new_tok[b, live] = s, src, t
                live += 1
                if live == k:
                    break
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:k]
            if len(finished[b]) >= k:
                best_live = float(new_scores[b].max())
                if best_live == float("-inf") or sequence_score(best_live, step + 1, length_penalty) <= finished[b][-1][0]:
                    done[b] = True
        if all(done) or step + 1 == max_gen_len:
            # Live beams that ran out of length compete as they are.
            for b in range(bsz):
                if not done[b]:
                    for j in range(k):
                        if new_scores[b, j] > float("-inf"):
                            hyp = tokens[b, new_src[b, j]].tolist() + [int(new_tok[b, j])]
                            finished[b].append((sequence_score(float(new_scores[b, j]), len(hyp), length_penalty), hyp))
            break
        rows = (torch.arange(bsz, device=dev)[:, None] * k + new_src).flatten()
        for layer_cache in cache:
            layer_cache.k.copy_(layer_cache.k.index_select(0, rows))
            layer_cache.v.copy_(layer_cache.v.index_select(0, rows))
        tokens = torch.cat([tokens.view(bsz * k, -1).index_select(0, rows).view(bsz, k, -1), new_tok[..., None]], -1)
        scores = new_scores
        logits = model(new_tok.view(-1, 1), cache=cache, start_pos=width + step, key_valid=key_valid,
                       last_only=True)[:, -1]
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


@torch.no_grad()
def score_continuations(model: Transformer, prompts: List[List[int]], continuations: List[List[int]], *,
                        eos_id: int, prefix: Optional[torch.Tensor] = None) -> List[float]:
    """Log-probability of each continuation followed by EOS, one sequence at a time (a check)."""
    out = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        ids = torch.tensor([p + c], device=model.device)
        emb = model.embed(ids)
        if prefix is not None:
            emb = torch.cat([prefix[i:i + 1].to(emb.dtype), emb], 1)
        logp = torch.log_softmax(model(embeddings=emb).double(), -1)[0]
        start = emb.shape[1] - len(c) - 1
        targets = c + [eos_id]
        out.append(sum(float(logp[start + j, t]) for j, t in enumerate(targets)))
    return out
