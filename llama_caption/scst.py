"""Self-critical sequence training (Rennie et al. 2017) through the frozen LLaMA.

For each image, `samples` captions are drawn from the captioner (no gradient, with the KV cache);
each gets its CIDEr-D against the image's references as the reward; the baseline is the mean
reward of the image's other samples (Luo 2020) or the reward of its greedy caption; the loss is
-(reward - baseline) x log p(sample), the log-probability summed over the sample's tokens (its
EOS included when it ended), computed in one teacher-forced forward through the frozen LLaMA
with logits only at the sampled positions, so the gradient reaches the projection only.

Sampling is keyed, not drawn from a generator: the Gumbel noise of token t of sample k of image
i is a hash of (seed, step, image id, k, t, token). So a sample does not depend on which rank
or which batch an image lands in: every model-parallel rank draws the same tokens, two
data-parallel ranks draw what one process would, and a resumed run draws what the uninterrupted
run drew.

`CiderD` is the reward: pycocoevalcap's CIDEr-D (n-grams 1-4, tf-idf, clipped, the Gaussian
length penalty with sigma 6, x10), with the document frequencies computed once from the
training split's references rather than from the batch, and a fast tokeniser (`tokenize`:
lowercase, words and numbers, punctuation dropped) instead of the Stanford PTB tokeniser, which
runs Java. The metrics reported at the end of a run still come from pycocoevalcap.
"""

import math
import re
from collections import defaultdict
from typing import Dict, Hashable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .llama.decoding import Decoding
from .llama.generation import decode_step, prefill, prefill_inputs
from .llama.model import Transformer

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
BASELINES = ("mean", "greedy")
REWARDS = ("cider", "clip", "cider+clip")


def tokenize(text: str) -> str:
    """The reward's tokeniser: lowercase words and numbers (with an apostrophe suffix kept),
    separated by single spaces; punctuation dropped."""
    return " ".join(WORD.findall(text.lower()))


def ngram_counts(words: Sequence[str], n: int) -> Dict[tuple, int]:
    counts: Dict[tuple, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D of candidates against fixed references; document frequencies from those references.

    references: {key: [caption, ...]}; captions are tokenised with `tokenize` unless
    `pretokenized` (then split on spaces as given).
    """

    def __init__(self, references: Dict[Hashable, List[str]], n: int = 4, sigma: float = 6.0,
                 pretokenized: bool = False):
        if not references:
            raise ValueError("CiderD needs references")
        self.n, self.sigma, self.pretokenized = n, sigma, pretokenized
        counts = {key: [ngram_counts(self.words(r), n) for r in refs] for key, refs in references.items()}
        self.df: Dict[tuple, float] = defaultdict(float)
        for refs in counts.values():
            for gram in {g for ref in refs for g in ref}:
                self.df[gram] += 1
        self.ref_len = math.log(float(len(counts)))
        self.refs = {key: [self.vector(c) for c in refs] for key, refs in counts.items()}

    def words(self, text: str) -> List[str]:
        return (text if self.pretokenized else tokenize(text)).split()

    def vector(self, counts: Dict[tuple, int]):
        """tf-idf weights per n-gram order, their norms, and the length pycocoevalcap uses (its
        count of bigrams: `n == 1` there indexes 2-grams)."""
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            w = float(tf) * (self.ref_len - math.log(max(1.0, self.df.get(gram, 0.0))))
            vec[order][gram] = w
            norm[order] += w * w
            if order == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(self, hyp, ref) -> float:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for order in range(self.n):
            val = sum(min(w, vr[order].get(g, 0.0)) * vr[order].get(g, 0.0) for g, w in vh[order].items())
            if nh[order] != 0 and nr[order] != 0:
                val /= nh[order] * nr[order]
            total += val * penalty
        return total / self.n

    def score(self, key: Hashable, candidate: str) -> float:
        hyp = self.vector(ngram_counts(self.words(candidate), self.n))
        refs = self.refs[key]
        return 10.0 * sum(self.similarity(hyp, r) for r in refs) / len(refs)

    def scores(self, keys: Sequence[Hashable], candidates: Sequence[str]) -> List[float]:
        return [self.score(k, c) for k, c in zip(keys, candidates)]


MASK64 = (1 << 64) - 1


def to_signed(x: int) -> int:
    x &= MASK64
    return x - (1 << 64) if x >> 63 else x


GOLDEN, MIX1, MIX2 = (to_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def logical_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps, as in C)."""
    x = x + GOLDEN
    x = (x ^ logical_shift(x, 30)) * MIX1
    x = (x ^ logical_shift(x, 27)) * MIX2
    return x ^ logical_shift(x, 31)


def sample_keys(seed: int, step: int, image_ids: Sequence[int], samples: int, device) -> torch.Tensor:
    """One int64 key per (image, sample), rows image-major: image i's samples are rows
    i*samples .. i*samples+samples-1."""
    ids = torch.tensor([int(i) for i in image_ids], dtype=torch.long, device=device)
    base = mix64(mix64(torch.tensor([seed], dtype=torch.long, device=device)) + step)
    k = torch.arange(samples, dtype=torch.long, device=device)
    return mix64(mix64(base + ids[:, None]) + k[None, :]).flatten()


def gumbel_noise(keys: torch.Tensor, t: int, vocab: int) -> torch.Tensor:
    """(R, vocab) Gumbel noise, a pure function of (key, t, token)."""
    h = mix64(mix64(keys + t)[:, None] + torch.arange(vocab, dtype=torch.long, device=keys.device)[None, :])
    u = (logical_shift(h, 40).double() + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def sample_captions(model: Transformer, prefix: torch.Tensor, bos_id: int, eos_id: int, decoding: Decoding,
                    keys: torch.Tensor, top_p: float = 1.0) -> Tuple[List[List[int]], List[bool]]:
    """One caption per row of `prefix` (R, P, dim) of at most `decoding.max_gen_len` tokens, drawn
    from softmax(logits / decoding.temperature) by the Gumbel-max trick with keyed noise (the
    keys carry the seed: `sample_keys`); with `top_p` < 1, from the smallest set of tokens whose
    probabilities reach it (nucleus sampling; SCST samples the whole distribution). Returns the
    tokens (without EOS) and whether each ended with EOS (False: it ran to the limit and is
    scored as it is)."""
    if not decoding.sampling:
        raise ValueError("keyed sampling needs a temperature above 0 (0 is greedy decoding)")
    rows, max_len, temperature = prefix.shape[0], decoding.max_gen_len, decoding.temperature
    emb, window = prefill_inputs(model, [[bos_id]] * rows, prefix, max_len)
    logits = prefill(model, emb, window)
    out = torch.zeros(rows, max_len, dtype=torch.long, device=emb.device)
    done = torch.zeros(rows, dtype=torch.bool, device=emb.device)
    for t in range(max_len):
        noise = gumbel_noise(keys, t, logits.shape[-1]).to(logits.device)
        scaled = logits.double() / temperature
        if top_p < 1.0:
            scaled = nucleus(scaled, top_p)
        tok = (scaled + noise).argmax(-1)
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)
        out[:, t] = tok
        done |= tok == eos_id
        if t + 1 == max_len or bool(done.all()):
            out = out[:, :t + 1]
            break
        logits = decode_step(model, tok, t, window)
    tokens, ended = [], []
    for row in out.tolist():
        if eos_id in row:
            tokens.append(row[:row.index(eos_id)])
            ended.append(True)
        else:
            tokens.append(row)
            ended.append(False)
    return tokens, ended


def nucleus(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """`scaled` logits (R, V) with every token outside the nucleus set to -inf: the most probable
    tokens, in order, until their probabilities reach `top_p` (the one that crosses it included)."""
    probs, order = torch.softmax(scaled, -1).sort(-1, descending=True)
    outside = (probs.cumsum(-1) - probs) >= top_p  # the mass before a token already reaches top_p
    return scaled.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


def sequence_logprobs(model: Transformer, prefix: torch.Tensor, tokens: List[List[int]], ended: List[bool],
                      bos_id: int, eos_id: int) -> torch.Tensor:
    """log p(sample) (R,), summed over the sample's tokens and its EOS when it ended, through the
    frozen model in one teacher-forced forward (logits only where a sampled token is predicted);
    differentiable with respect to `prefix` (R, P, dim)."""
    rows, plen = prefix.shape[0], prefix.shape[1]
    targets = [t + ([eos_id] if e else []) for t, e in zip(tokens, ended)]
    width = 1 + max(len(t) for t in tokens)
    dev = prefix.device
    inputs = torch.zeros(rows, width, dtype=torch.long, device=dev)
    labels = torch.full((rows, plen + width), -1, dtype=torch.long, device=dev)
    for i, (t, y) in enumerate(zip(tokens, targets)):
        inputs[i, :len(t) + 1] = torch.tensor([bos_id] + t, device=dev)
        if y:  # logits at prefix + j predict the input at prefix + j + 1
            labels[i, plen:plen + len(y)] = torch.tensor(y, device=dev)
    targeted = labels >= 0
    emb = torch.cat([prefix.to(model.dtype), model.embed(inputs)], 1)
    logits = model(embeddings=emb, logits_at=targeted)
    picked = F.log_softmax(logits.float(), -1).gather(1, labels[targeted][:, None]).squeeze(1)
    row_of = torch.arange(rows, device=dev)[:, None].expand_as(targeted)[targeted]
    return torch.zeros(rows, device=dev, dtype=picked.dtype).index_add(0, row_of, picked)


def advantages(rewards: torch.Tensor, baseline: str = "mean", greedy: torch.Tensor = None) -> torch.Tensor:
    """rewards (B, K) -> reward minus baseline (B, K). mean: each sample against the mean of the
    image's other samples (so an image's advantages sum to zero); greedy: against the reward of
    the image's greedy caption, greedy (B,)."""
    if baseline == "mean":
        k = rewards.shape[1]
        if k < 2:
            raise ValueError("the mean baseline needs at least 2 samples per image")
        others = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
        return rewards - others
    if baseline == "greedy":
        return rewards - greedy[:, None]
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
