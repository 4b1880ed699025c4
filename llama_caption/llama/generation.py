"""Batched decoding with the KV cache: prefill the whole prompt once, then one token a step.

Prompts of different lengths are left-padded; `key_valid` masks the padding out of attention
and shifts rotary positions so each sequence starts at position 0, exactly as if run alone.
An optional per-sequence embedding prefix (the image) stands before each text prompt.

The pieces, in the order a decoder uses them: `prefill_inputs` (padded embeddings, padding mask,
KV cache), `prefill` (the prompt through the model), `decode_step` (one token through it), and
`pick_next` (greedy or top-p). `generate` and `beam_search` are loops over them; decoding.decode
picks one of them (or a fixed-shape decoder) by the Decoding settings, and checks those.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .model import KVCache, Transformer


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
        valid[i, width - lengths[i]:] = True
        if t:
            tokens[i, width - len(t):] = torch.tensor(t, device=dev)
            is_text[i, width - len(t):] = True
    emb = model.embed(tokens) * is_text[..., None].to(model.dtype)
    if prefix is not None:
        for i, n in enumerate(lengths):
            emb[i, width - n:width - n + p_len] = prefix[i].to(emb.dtype)
    return emb, valid


@dataclass
class Window:
    """What decoding carries from step to step: the prompt's width, the padding mask of the whole
    window (None without padding) and the KV cache."""

    width: int
    key_valid: Optional[torch.Tensor]
    cache: List[KVCache] = field(repr=False)


def prefill_inputs(model: Transformer, prompts: List[List[int]], prefix: Optional[torch.Tensor], max_gen_len: int,
                   copies: int = 1) -> Tuple[torch.Tensor, Window]:
    """Prefill embeddings (each prompt `copies` times, adjacent) and a window sized for
    prompt + max_gen_len."""
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
    return emb, Window(width, key_valid, model.new_cache(rows, width + max_gen_len))


def prefill(model: Transformer, emb: torch.Tensor, window: Window) -> torch.Tensor:
    """The prompt through the model, filling the cache; the last position's logits (B, vocab)."""
    return model(embeddings=emb, cache=window.cache, start_pos=0, key_valid=window.key_valid, last_only=True)[:, -1]


def decode_step(model: Transformer, tokens: torch.Tensor, step: int, window: Window) -> torch.Tensor:
    """Generated token `step` (B,) through the model; the logits of the next one (B, vocab)."""
    return model(tokens[:, None], cache=window.cache, start_pos=window.width + step, key_valid=window.key_valid,
                 last_only=True)[:, -1]


def cut_at_eos(ids: List[int], eos_id: Union[int, Sequence[int]]) -> List[int]:
    """`ids` up to (without) the first end token; `eos_id` is one id or several."""
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: List[List[int]],
    *,
    eos_id: Union[int, Sequence[int]],
    max_gen_len: int,
    prefix: Optional[torch.Tensor] = None,
    temperature: float = 0.0,
    top_p: float = 0.95,
    generator: Optional[torch.Generator] = None,
) -> List[List[int]]:
    """Generate up to `max_gen_len` tokens after each prompt; each list stops before its EOS
    (`eos_id`: one id, or several that all end a sequence, e.g. Llama 3's `tokenizer.stop_ids`).

    prompts: token ids per sequence (BOS included by the caller); prefix: (B, P, dim) embeddings
    placed before each prompt, or None. Every model-parallel rank must call this with the same
    arguments and RNG state; the logits are gathered, so all ranks pick the same tokens.
    """
    emb, window = prefill_inputs(model, prompts, prefix, max_gen_len)
    logits = prefill(model, emb, window)
    out = torch.zeros(len(prompts), max_gen_len, dtype=torch.long, device=emb.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=emb.device)
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=emb.device)
    steps = 0
    for step in range(max_gen_len):
        tok = pick_next(logits, temperature, top_p, generator)
        tok = torch.where(done, stops[0], tok)
        out[:, step] = tok
        steps = step + 1
        done |= torch.isin(tok, stops)
        # Asking whether all sequences ended waits for the device: do it every few steps only.
        if step + 1 == max_gen_len or (step % 4 == 3 and bool(done.all())):
            break
        logits = decode_step(model, tok, step, window)
    return [cut_at_eos(row, eos_id) for row in out[:, :steps].tolist()]


def sequence_score(logprob_sum: float, length: int, length_penalty: float) -> float:
    """Length-normalised log-probability: sum / length**alpha (alpha 0: the plain sum)."""
    return logprob_sum / (max(length, 1) ** length_penalty)


class Beams:
    """The beam-search state of one batch: `k` live beams per prompt (rows b*k .. b*k+k-1 of the
    decoding batch), their summed log-probabilities and tokens, and the ended hypotheses."""

    def __init__(self, bsz: int, k: int, eos_id: int, length_penalty: float, device):
        self.bsz, self.k, self.eos_id, self.alpha, self.device = bsz, k, eos_id, length_penalty, device
        # Beams of one prompt start identical: only the first may expand at step 0.
        self.scores = torch.zeros(bsz, k, dtype=torch.float64, device=device)
        self.scores[:, 1:] = float("-inf")
        self.tokens = torch.zeros(bsz, k, 0, dtype=torch.long, device=device)
        self.finished: List[List[tuple]] = [[] for _ in range(bsz)]
        self.done = [False] * bsz

    def select(self, logits: torch.Tensor):
        """From (bsz*k, vocab) logits: each prompt's next k live beams (scores, source beam,
        token); EOS candidates ranked among the top k end a hypothesis instead."""
        k, vocab = self.k, logits.shape[-1]
        logp = torch.log_softmax(logits.double(), dim=-1).view(self.bsz, k, vocab)
        top_scores, top_idx = (self.scores[..., None] + logp).view(self.bsz, k * vocab).topk(2 * k, dim=-1)
        beam_src, tok = (top_idx // vocab).tolist(), (top_idx % vocab).tolist()
        top_scores = top_scores.tolist()
        new_scores = torch.full((self.bsz, k), float("-inf"), dtype=torch.float64, device=self.device)
        new_src = torch.zeros(self.bsz, k, dtype=torch.long, device=self.device)
        new_tok = torch.full((self.bsz, k), self.eos_id, dtype=torch.long, device=self.device)
        for b in range(self.bsz):
            if self.done[b]:
                continue
            live = 0
            for rank in range(2 * k):
                s, src, t = top_scores[b][rank], beam_src[b][rank], tok[b][rank]
                if s == float("-inf") or live == k:
                    break
                if t == self.eos_id:
                    if rank < k:
                        self.end(b, s, self.tokens[b, src].tolist() + [t])
                    continue
                new_scores[b, live], new_src[b, live], new_tok[b, live] = s, src, t
                live += 1
        return new_scores, new_src, new_tok

    def end(self, b: int, score: float, hyp: List[int]) -> None:
        """Record an ended hypothesis (its length counts EOS; EOS itself is not kept)."""
        self.finished[b].append((sequence_score(score, len(hyp), self.alpha), cut_at_eos(hyp, self.eos_id)))
        self.finished[b] = sorted(self.finished[b], key=lambda h: -h[0])[: self.k]

    def update_done(self, new_scores: torch.Tensor, length: int) -> None:
        """A prompt is done when it holds k ended hypotheses and no live beam can still rank
        above the worst of them."""
        for b in range(self.bsz):
            if self.done[b] or len(self.finished[b]) < self.k:
                continue
            best_live = float(new_scores[b].max())
            if best_live == float("-inf") or sequence_score(best_live, length, self.alpha) <= self.finished[b][-1][0]:
                self.done[b] = True

    def advance(self, new_scores, new_src, new_tok) -> torch.Tensor:
        """Move to the selected beams; returns the cache rows each new beam continues from."""
        rows = (torch.arange(self.bsz, device=self.device)[:, None] * self.k + new_src).flatten()
        self.tokens = torch.cat([self.tokens.view(self.bsz * self.k, -1).index_select(0, rows)
                                 .view(self.bsz, self.k, -1), new_tok[..., None]], -1)
        self.scores = new_scores
        return rows

    def close(self, new_scores, new_src, new_tok) -> None:
        """Out of length: live beams of unfinished prompts compete as they are."""
        for b in range(self.bsz):
            if self.done[b]:
                continue
            for j in range(self.k):
                if new_scores[b, j] > float("-inf"):
                    hyp = self.tokens[b, new_src[b, j]].tolist() + [int(new_tok[b, j])]
                    self.finished[b].append((sequence_score(float(new_scores[b, j]), len(hyp), self.alpha), hyp))

    def best(self) -> List[List[int]]:
        return [max(f, key=lambda h: h[0])[1] if f else [] for f in self.finished]

    def ranked(self, n: int) -> List[List[List[int]]]:
        """The `n` best hypotheses of each prompt, best first (the first is `best`'s)."""
        return [[h[1] for h in sorted(f, key=lambda h: -h[0])[:n]] for f in self.finished]


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
    num_return: int = 1,
) -> List[List[int]]:
    """Beam search with the KV cache; returns the best hypothesis of each prompt (without EOS),
    or with `num_return` > 1 (at most `num_beams`) a list of its best ones, best first.

    Hypotheses are ranked by `sequence_score` of their tokens' log-probabilities, EOS included
    when they have ended. Only an EOS ranked among the top `num_beams` candidates ends a
    hypothesis, so one beam is exactly greedy decoding.
    """
    emb, window = prefill_inputs(model, prompts, prefix, max_gen_len, copies=num_beams)
    logits = prefill(model, emb, window)
    beams = Beams(len(prompts), num_beams, eos_id, length_penalty, emb.device)
    for step in range(max_gen_len):
        selected = beams.select(logits)
        beams.update_done(selected[0], step + 1)
        if all(beams.done) or step + 1 == max_gen_len:
            beams.close(*selected)
            break
        rows = beams.advance(*selected)
        for layer_cache in window.cache:
            layer_cache.reorder(rows)
        logits = decode_step(model, selected[2].view(-1), step, window)
    return beams.best() if num_return == 1 else beams.ranked(num_return)
