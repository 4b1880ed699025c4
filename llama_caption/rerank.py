"""The best of several captions: n candidates per image, and the rule that picks one.

Candidates come from sampling or from beam search (`candidates`):

- sampling (temperature > 0): the n captions of an image are drawn with keyed noise
  (scst.sample_keys: the seed, the image's key, the candidate's number), so an image's
  candidates depend on nothing else: not its batch, its rank, or a rerun;
- beams (num_beams >= n): the n best hypotheses of the image's beam search.

Each candidate carries its mean token log-probability (Captioner.mean_logprob, the end token
included when it ended), its CLIP-S when a CLIP that reads text is at hand (the captioner's own:
`ClipRanker`), and its consensus score (`mbr_scores`). `--rerank` picks by one of them:

- logprob: the likeliest caption per token;
- clip: the highest CLIP-S, 2.5 * max(cos(image, "A photo depicts " + caption), 0);
- mbr: minimum Bayes risk with CIDEr-D as the utility: the candidate with the highest mean
  CIDEr-D against the image's other candidates. No reference is used; the n-grams' document
  frequencies are counted over the image's own candidates (each one a document), so an n-gram
  every candidate shares weighs nothing: it cannot tell them apart.

Ties go to the earlier candidate (for samples, the lower number; for beams, the better beam).
"""

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Union

import torch

from .errors import UserError
from .llama.decoding import Decoding
from .scst import CiderD

RULES = ("logprob", "clip", "mbr")
MAX_CANDIDATES = 32  # per image: candidates are decoded together, n rows per image


@dataclass
class Candidate:
    text: str
    tokens: List[int]
    ended: bool
    logprob: float = 0.0
    clip_s: Optional[float] = None
    mbr: float = 0.0

    def record(self) -> dict:
        """As a results file keeps it (--keep_candidates)."""
        d = {"caption": self.text, "logprob": round(self.logprob, 6), "mbr": round(self.mbr, 6)}
        if self.clip_s is not None:
            d["clip_s"] = round(self.clip_s, 6)
        return d


@dataclass
class Choice:
    """An image's candidates and the one its rule picked."""

    candidates: List[Candidate]
    chosen: int
    rule: str

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]


@dataclass(frozen=True)
class BestOf:
    """How many candidates per image and the rule that picks one (`--num_candidates`, `--rerank`)."""

    n: int = 1
    rule: str = "logprob"

    @property
    def active(self) -> bool:
        return self.n > 1

    def check(self, decoding: Decoding, name=lambda n: "--" + n) -> "BestOf":
        """Before any work: n in [1, MAX_CANDIDATES], a known rule, and a way to make n different
        candidates (sampling, or at least n beams)."""
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_CANDIDATES:
            raise UserError(f"{name('num_candidates')} must be a whole number from 1 to {MAX_CANDIDATES}, got {self.n!r}")
        if self.rule not in RULES:
            raise UserError(f"{name('rerank')} {self.rule!r} must be one of {', '.join(RULES)}")
        if self.n > 1 and not decoding.sampling and decoding.num_beams < self.n:
            raise UserError(f"{name('num_candidates')} {self.n} needs {self.n} different captions per image: sample them "
                            f"({name('temperature')} above 0) or take the best beams ({name('num_beams')} at least {self.n})")
        return self

    def provenance(self) -> dict:
        """What a results file records (nothing when one caption per image is decoded)."""
        return {"num_candidates": self.n, "rerank": self.rule} if self.active else {}


def mbr_scores(texts: Sequence[str]) -> List[float]:
    """Each candidate's mean CIDEr-D against the others (document frequencies over these
    candidates, each its own document); 0 for a lone candidate."""
    n = len(texts)
    if n < 2:
        return [0.0] * n
    scorer = CiderD({i: [t] for i, t in enumerate(texts)})
    vectors = [scorer.refs[i][0] for i in range(n)]
    return [10.0 * sum(scorer.similarity(vectors[i], vectors[j]) for j in range(n) if j != i) / (n - 1)
            for i in range(n)]


def pick(candidates: List[Candidate], rule: str) -> int:
    """The index `rule` picks (the first of equals)."""
    key = {"logprob": lambda c: c.logprob, "clip": lambda c: c.clip_s, "mbr": lambda c: c.mbr}[rule]
    values = [key(c) for c in candidates]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        raise ValueError(f"--rerank {rule}: a candidate has no {rule} score")
    return max(range(len(values)), key=lambda i: (values[i], -i))


@dataclass
class ClipRanker:
    """CLIP-S of captions against images through a CLIP's two towers (clipscore.TextImageModel),
    from images already preprocessed for that CLIP (the captioner's own)."""

    model: object  # clipscore.TextImageModel

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model
        return torch.nn.functional.normalize(m.model.encode_image(pixels.to(m.device, m.dtype)).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_check(self) -> None:
        """Read one text through the text tower (raises what it raises)."""
        from .clipscore import text_features

        text_features(self.model, ["a photo"], 1)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, texts: List[str]) -> List[float]:
        """CLIP-S of each text against its row of `images` (normalised image features)."""
        from .clipscore import clip_s, text_features

        return clip_s(images, text_features(self.model, list(texts), 256)).tolist()


def clip_ranker(encoder_spec, device, flag: str = "--rerank clip") -> ClipRanker:
    """The captioner's own CLIP with its text tower, or one line saying why there is none."""
    from .clipscore import Unavailable, load_model

    try:
        model = load_model(encoder_spec.clip_model, encoder_spec.pretrained, device)
    except (Unavailable, UserError) as e:
        raise UserError(f"{flag} needs a CLIP that reads text: the captioner's own ({encoder_spec.clip_model}) could "
                        f"not be loaded with its text tower ({e}); use --rerank logprob or mbr") from None
    if not hasattr(model.model, "encode_text"):
        raise UserError(f"{flag} needs a CLIP that reads text: {encoder_spec.clip_model} has no text tower; use "
                        f"--rerank logprob or mbr")
    ranker = ClipRanker(model)
    try:  # its tokenizer and text tower together (an open_clip config may pair a tokenizer with a smaller vocabulary)
        ranker.text_check()
    except Exception as e:
        raise UserError(f"{flag} needs a CLIP that reads text: the text tower of {encoder_spec.clip_model} does not run "
                        f"with its tokenizer ({type(e).__name__}: {str(e)[:120]}); use --rerank logprob or mbr") from None
    return ranker


class Rankers:
    """Each captioner's own ClipRanker (`clip_ranker`), loaded at its first use. A CLIP that
    cannot rank is tried once: its one-line reason is kept and given again."""

    def __init__(self, device, flag: str):
        self.device, self.flag = device, flag
        self.loaded: Dict[str, Union[ClipRanker, UserError]] = {}

    def get(self, name: str, opened, required: bool = True) -> Optional[ClipRanker]:
        """Captioner `name`'s ranker (`opened`: its opening.OpenedCaptioner); without one, the
        reason is raised when `required` (rerank clip), else None (the candidates go without CLIP-S)."""
        if name not in self.loaded:
            try:
                self.loaded[name] = clip_ranker(opened.spec.encoder, self.device, self.flag)
            except UserError as e:
                self.loaded[name] = e
        got = self.loaded[name]
        if isinstance(got, UserError):
            if required:
                raise got
            return None
        return got


def choose(opened, pixels: torch.Tensor, keys: Sequence[int], decoding: Decoding, best_of: BestOf,
           ranker: Optional[ClipRanker] = None) -> List[Choice]:
    """`best_of.n` candidates of each image of `pixels` (preprocessed for the captioner;
    `keys`: each image's sampling key, its id), their scores, and the one `best_of.rule` picks."""
    from .scst import sample_captions, sample_keys

    cap = opened.captioner
    tok = cap.tokenizer
    n = best_of.n
    limit = cap.longest(decoding)
    d = replace(decoding, max_gen_len=limit)
    with torch.no_grad():
        prefix = cap.prefix(opened.encoder(pixels))
        rows = prefix.repeat_interleave(n, 0)
        if d.sampling:
            tokens, ended = sample_captions(cap.llama, rows, tok.bos_id, tok.eos_id, d,
                                            sample_keys(d.seed, 0, keys, n, rows.device), top_p=d.top_p)
        else:
            from .llama.generation import beam_search

            ranked = beam_search(cap.llama, [[tok.bos_id]] * len(keys), eos_id=tok.eos_id, max_gen_len=limit,
                                 num_beams=d.num_beams, prefix=prefix, length_penalty=d.length_penalty, num_return=n)
            ranked = [r + [r[-1]] * (n - len(r)) for r in ranked]  # (a beam search ends with at least n hypotheses)
            tokens = [t for r in ranked for t in r]
            ended = [len(t) < limit for t in tokens]
        logprobs = cap.mean_logprob(rows, tokens, ended)
    texts = [tok.decode(t).strip() for t in tokens]
    clip = None
    if ranker is not None:
        feats = ranker.image_features(pixels).repeat_interleave(n, 0)
        clip = ranker.scores(feats, texts)
    out = []
    for i in range(len(keys)):
        part = slice(i * n, (i + 1) * n)
        cands = [Candidate(t, list(k), e, lp, None if clip is None else c) for t, k, e, lp, c in
                 zip(texts[part], tokens[part], ended[part], logprobs[part], (clip or [None] * len(texts))[part])]
        for c, m in zip(cands, mbr_scores([c.text for c in cands])):
            c.mbr = m
        out.append(Choice(cands, pick(cands, best_of.rule), best_of.rule))
    return out
