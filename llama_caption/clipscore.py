"""CLIP-S and RefCLIP-S (Hessel et al., 2021, "CLIPScore"), as the paper defines them.

Candidates and references alike are read as "A photo depicts " + text; image and text
features are L2-normalised;

    CLIP-S    = 2.5 * max(cos(image, caption), 0)
    RefCLIP-S = harmonic mean of CLIP-S and max(max over the image's references of cos(caption, reference), 0)

(the second term unscaled). The paper clips the reference term at 0 as it clips CLIP-S; the
authors' clipscore.py does not, so where every reference cosine is negative (which English
captions under a trained CLIP practically never are) its RefCLIP-S can go below 0 and ours is 0. Reported as the mean over the images (x100 in the tables, as papers
do). CLIP ViT-B/32 by default, as the paper; any `clip` model or file, or open_clip model, can be
named, and the metrics file records which. Nothing is downloaded: a released model that is not
in the `clip` package's cache (~/.cache/clip) is skipped with a line saying how to fetch it.
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .config import Config, setting
from .data import ImageFiles, ImageRecord, collate
from .errors import UserError
from .vision import OPEN_CLIP, EncoderSpec, OpenClipEncoder, check_encoder_flags, clip_identity, import_clip, load_clip

PREFIX = "A photo depicts "
WEIGHT = 2.5
DEFAULT_MODEL = "ViT-B/32"
CLIP_CACHE = os.path.join("~", ".cache", "clip")  # the clip package's download folder


class Unavailable(Exception):
    """The CLIP-S model cannot be loaded here: CLIP-S is skipped, with this line."""


@dataclass(kw_only=True)
class ClipScoreSettings(Config):
    """The CLIP-S flags of the commands that score captions (`caption`, `evaluate`)."""

    clipscore: bool = setting(True, "also compute CLIP-S and RefCLIP-S (Hessel et al. 2021) after the other metrics; skipped, with a line saying why, when --clipscore_model cannot be loaded.")
    clipscore_model: str = setting(DEFAULT_MODEL, "the CLIP that computes CLIP-S: a released `clip` name (ViT-B/32, as the paper; read from ~/.cache/clip, never downloaded here), a CLIP file, or open_clip:ARCH with --clipscore_pretrained.")
    clipscore_pretrained: Optional[str] = setting(None, "with --clipscore_model open_clip:ARCH: its weights file or pretrained tag.")

    def check(self) -> None:
        self.check_clipscore()

    def check_clipscore(self) -> None:
        name = self.clipscore_model
        try:
            check_encoder_flags(name, self.clipscore_pretrained)
        except UserError as e:
            raise UserError(own_flags(str(e))) from None
        if not name.startswith(OPEN_CLIP) and not os.path.isfile(name) and name not in import_clip().available_models():
            raise UserError(f"--clipscore_model {name!r} is neither a file nor one of {import_clip().available_models()}")


def own_flags(message: str) -> str:
    """An encoder's message, with the flags CLIP-S takes its model from."""
    return message.replace("--clip_model", "--clipscore_model").replace("--clip_pretrained", "--clipscore_pretrained")


@dataclass
class TextImageModel:
    """Both towers of a CLIP: `preprocess` (PIL image to tensor) and `tokenize` (texts to ids)."""

    identity: str
    model: nn.Module
    preprocess: Callable
    tokenize: Callable[[List[str]], torch.Tensor]
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype


def load_clip_model(name: str, device) -> TextImageModel:
    """A `clip` model: a file, or a released name already in the cache."""
    clip = import_clip()
    if os.path.isfile(name):
        identity = clip_identity(name)
        try:
            model, preprocess = load_clip(name, device)
        except UserError as e:
            raise Unavailable(own_flags(str(e))) from None
    else:
        cache = os.path.expanduser(CLIP_CACHE)
        if not os.path.isfile(os.path.join(cache, os.path.basename(clip.clip._MODELS[name]))):
            raise Unavailable(f"{name} is not in {cache} and nothing is downloaded here: fetch it once, online, with "
                              f"python -c \"import clip; clip.load('{name}')\", or pass --clipscore_model FILE")
        identity = name
        model, preprocess = clip.load(name, device=device, jit=False, download_root=cache)
    model.requires_grad_(False).eval()
    tokenize = lambda texts: clip.tokenize(texts, context_length=model.context_length, truncate=True)  # noqa: E731
    return TextImageModel(identity, model, preprocess, tokenize, torch.device(device))


def load_open_clip_model(name: str, pretrained: Optional[str], device) -> TextImageModel:
    import open_clip

    spec = EncoderSpec.of(name, pretrained=pretrained)
    offline = pretrained is not None and not os.path.isfile(pretrained)  # a tag: its weights from the hub's cache only
    try:
        if offline:
            import huggingface_hub.constants as hub

            was, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
        try:
            model, preprocess = OpenClipEncoder.load(spec, device)
        finally:
            if offline:
                hub.HF_HUB_OFFLINE = was
    except UserError as e:
        raise Unavailable(own_flags(str(e))) from None
    except Exception as e:  # not in the cache: the hub's offline error, of several kinds
        raise Unavailable(f"--clipscore_pretrained {pretrained} of {name} is not in the local cache and nothing is "
                          f"downloaded here ({type(e).__name__}): fetch it once online, or pass the weights file") from None
    arch = name[len(OPEN_CLIP):]
    registered = os.path.splitext(os.path.basename(arch))[0] if arch.endswith(".json") else arch
    model.requires_grad_(False).eval()
    return TextImageModel(spec.identity, model, preprocess, open_clip.get_tokenizer(registered), torch.device(device))


def load_model(name: str, pretrained: Optional[str], device) -> TextImageModel:
    if name.startswith(OPEN_CLIP):
        return load_open_clip_model(name, pretrained, device)
    return load_clip_model(name, device)


@torch.no_grad()
def image_features(m: TextImageModel, records: List[ImageRecord], batch_size: int, num_workers: int) -> Dict[int, torch.Tensor]:
    """image id -> the L2-normalised image feature (unreadable images are left out)."""
    loader = torch.utils.data.DataLoader(ImageFiles(records, m.preprocess), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate)
    out = {}
    for batch in loader:
        if batch["image_id"]:
            feats = m.model.encode_image(batch["pixels"].to(m.device, m.dtype)).float()
            out.update(zip(batch["image_id"], torch.nn.functional.normalize(feats, dim=-1).cpu()))
    return out


@torch.no_grad()
def text_features(m: TextImageModel, texts: List[str], batch_size: int) -> torch.Tensor:
    """L2-normalised features of PREFIX + each text, one row per text."""
    rows = []
    for i in range(0, len(texts), batch_size):
        ids = m.tokenize([PREFIX + t for t in texts[i:i + batch_size]]).to(m.device)
        rows.append(torch.nn.functional.normalize(m.model.encode_text(ids).float(), dim=-1).cpu())
    return torch.cat(rows) if rows else torch.zeros(0)


def clip_s(image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """CLIP-S of normalised (N, D) image and caption features."""
    return WEIGHT * (image * caption).sum(-1).clamp(min=0)


def ref_clip_s(clip_score: float, caption: torch.Tensor, references: torch.Tensor) -> float:
    """RefCLIP-S of one caption: the harmonic mean of its CLIP-S and its best cosine with a
    reference, clipped at 0 as the paper defines it (so RefCLIP-S is never below 0)."""
    best = max(float((references @ caption).max()), 0.0)
    total = clip_score + best
    return 2 * clip_score * best / total if total else 0.0


def per_image_scores(m: TextImageModel, results: List[Dict], records: Dict[int, ImageRecord], batch_size: int = 64,
                     num_workers: int = 0) -> Dict[int, Dict[str, float]]:
    """image id -> {"CLIP-S", and "RefCLIP-S" where the image has references}."""
    images = image_features(m, [records[r["image_id"]] for r in results], batch_size, num_workers)
    scored = [r for r in results if r["image_id"] in images]
    captions = text_features(m, [r["caption"] for r in scored], batch_size)
    refs = [records[r["image_id"]].captions for r in scored]
    ref_feats = text_features(m, [c for rs in refs for c in rs], batch_size)
    out, start = {}, 0
    for r, caption, rs in zip(scored, captions, refs):
        value = float(clip_s(images[r["image_id"]], caption))
        out[r["image_id"]] = {"CLIP-S": value}
        if rs:
            out[r["image_id"]]["RefCLIP-S"] = ref_clip_s(value, caption, ref_feats[start:start + len(rs)])
        start += len(rs)
    return out


def means(per_image: Dict[int, Dict[str, float]], ids) -> Dict[str, float]:
    """The corpus CLIP-S and RefCLIP-S of the images `ids`: means over those that have them."""
    out = {}
    for name in ("CLIP-S", "RefCLIP-S"):
        values = [per_image[i][name] for i in ids if name in per_image.get(i, {})]
        if values:
            out[name] = sum(values) / len(values)
    return out


def compute(settings: ClipScoreSettings, results: List[Dict], records: Dict[int, ImageRecord], device,
            num_workers: int = 0, log=print) -> Optional[tuple]:
    """(per-image scores, what computed them) or None when the model cannot be loaded (said in one line)."""
    try:
        m = load_model(settings.clipscore_model, settings.clipscore_pretrained, device)
    except Unavailable as e:
        log(f"CLIP-S skipped: {e}")
        return None
    try:
        per_image = per_image_scores(m, results, records, num_workers=num_workers)
    except (IndexError, RuntimeError, ValueError) as e:  # e.g. a tokenizer whose ids the text tower lacks
        log(f"CLIP-S skipped: {settings.clipscore_model} failed on the captions ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); the other metrics are written")
        return None
    about = {"model": settings.clipscore_model, "identity": m.identity, "prefix": PREFIX, "weight": WEIGHT,
             "images": len(per_image)}
    return per_image, about
