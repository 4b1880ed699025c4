"""The Python API: open trained captioners once, caption images from a notebook or a script.

    import llama_caption
    cap = llama_caption.load("llama/7B", "runs/coco")                   # the same settings as `caption`
    cap.caption("dog.jpg")                                              # 'a dog lying on a couch'
    cap.caption([pil_image, open("cat.png", "rb").read()], num_beams=3)  # one caption per image
    cap.caption("dog.jpg", scores=True)                                 # {'caption': ..., 'logprob': ...}

`load` takes `caption`'s flags as keyword arguments (opening.CaptionerSettings), checked as the
command checks them (a bad one raises errors.UserError with the command's one-line message),
and opens the captioner as every command does (opening.open_captioners). Several trained runs
over one LLaMA share it: `load("llama/7B", {"coco": "runs/coco", "scst": "runs/scst"})`, then
`cap.caption(image, model="scst")`.

In a plain process (a notebook) it makes a one-process group itself; under torchrun it joins the
launcher's, for model parallelism: every rank then loads and calls `caption` with the same
images in the same order (rank 0's captions are everyone's).
"""

import io
import os
from dataclasses import fields
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from . import distributed
from .data import open_rgb
from .errors import UserError
from .llama.decoding import Decoding
from .opening import CaptionerSettings, OpenedCaptioner, caption_parts, named_checkpoints, open_captioners
from .rerank import BestOf, Rankers, choose

ImageLike = Union[str, os.PathLike, bytes, "PIL.Image.Image", torch.Tensor]  # noqa: F821


def load(ckpt_dir: str, checkpoint: Union[str, Sequence[str], Dict[str, str]], *, batch_size: int = 16,
         max_gen_len: int = 30, **settings) -> "Captioners":
    """Trained captioners over the LLaMA in `ckpt_dir`: `checkpoint` is a run folder (or one
    checkpoint folder), a list of them, or {name: folder}. `settings` are `caption`'s captioner
    flags: tokenizer_path, model_parallel, device, quantize, dtype, decoder, pack_weights,
    clip_model, clip_pretrained. `batch_size` images are decoded together; `max_gen_len` is the
    longest caption a call may ask for (it sizes the KV cache)."""
    known = {f.name for f in fields(CaptionerSettings)} - {"ckpt_dir", "checkpoint"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"load() got an unknown setting {unknown[0]!r}: the settings are {', '.join(sorted(known))}")
    if not isinstance(checkpoint, (str, os.PathLike, list, tuple, dict)):
        raise UserError(f"checkpoint must be a run folder, a list of them or {{name: folder}}, got "
                        f"{type(checkpoint).__name__}")
    named = named_checkpoints(checkpoint, "checkpoint")
    cfg = CaptionerSettings(ckpt_dir=ckpt_dir, checkpoint=next(iter(named.values())), **settings)
    default = Decoding(max_gen_len=max_gen_len).check(str)
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    env = distributed.setup(cfg.mp_size(), cfg.device, quiet=False)
    opened = open_captioners(cfg, named, env, default, batch_size)
    return Captioners(opened, batch_size, max_gen_len, env)


class Captioners:
    """Trained captioners over one frozen LLaMA (`load`'s): `caption` images with one of them."""

    def __init__(self, opened: Dict[str, OpenedCaptioner], batch_size: int, max_gen_len: int, env):
        self.opened, self.batch_size, self.max_gen_len, self.env = opened, batch_size, max_gen_len, env
        self.rankers = Rankers(env.device, "rerank='clip'")

    @property
    def names(self) -> List[str]:
        """The captioners' names; the first is the default."""
        return list(self.opened)

    def __repr__(self) -> str:
        first = next(iter(self.opened.values()))
        return (f"Captioners({', '.join(self.names)}; LLaMA width {first.captioner.llama.args.dim}, "
                f"{first.dtype}, decoder {first.decoder}, on {self.env.device})")

    def caption(self, images: Union[ImageLike, Sequence[ImageLike]], *, model: Optional[str] = None,
                scores: bool = False, num_candidates: int = 1, rerank: str = "logprob", **decoding) -> Any:
        """One caption per image: `images` is one image or a list of them, each a file path, a PIL
        image, the bytes of an image file, or a tensor the captioner's preprocessing made ((3, H,
        W), or (N, 3, H, W) for N images). `decoding`: max_gen_len, temperature, top_p, seed,
        num_beams, length_penalty (llama/decoding.py; greedy by default). `num_candidates` > 1
        decodes that many per image (sampled, the i-th image of a call drawing from key i, or the
        best beams) and keeps the one `rerank` picks (logprob, clip or mbr: rerank.py). Returns a
        caption (str) for one image, a list for a list or batch; with `scores`, each is
        {"caption", "logprob"} (the caption's mean token log-probability, its end token included
        when it ended), with "candidates" (each with its logprob, mbr and clip_s) when there are several."""
        if not isinstance(scores, bool):
            raise TypeError(f"scores must be True or False, got {scores!r}")
        name, opened = self.pick(model)
        d = self.decoding(decoding)
        best_of = BestOf(num_candidates, rerank).check(d, str)
        ranker = None
        if best_of.active and (rerank == "clip" or scores):  # scores go without CLIP-S when the CLIP reads no text
            ranker = self.rankers.get(name, opened, required=rerank == "clip")
        single = not isinstance(images, (list, tuple)) and not (torch.is_tensor(images) and images.dim() == 4)
        pixels = self.pixels([images] if single else images, opened)
        shown = []
        gen = d.generator(0, opened.captioner.llama.device)  # one draw per call: a call gives the same captions again
        for start in range(0, len(pixels), self.batch_size):
            batch = torch.stack(pixels[start:start + self.batch_size])
            if best_of.active:
                keys = list(range(start, start + len(batch)))
                for c in choose(opened, batch, keys, d, best_of, ranker):
                    shown.append({"caption": c.best.text, "logprob": c.best.logprob,
                                  "candidates": [x.record() for x in c.candidates]} if scores else c.best.text)
            else:
                shown += [{"caption": c.text, "logprob": c.logprob} if scores else c.text
                          for c in caption_parts([(opened, batch)], d, gen, scores=scores)]
        return shown[0] if single else shown

    def ranker(self, name: str, opened: OpenedCaptioner):
        """The captioner's own CLIP with its text tower, loaded once (rerank.Rankers); UserError
        when it has none."""
        return self.rankers.get(name, opened)

    def pick(self, model: Optional[str]):
        if model is None:
            return next(iter(self.opened.items()))
        if model not in self.opened:
            raise UserError(f"model {model!r} is not loaded: the captioners are {', '.join(self.opened)}")
        return model, self.opened[model]

    def decoding(self, given: dict) -> Decoding:
        unknown = sorted(set(given) - set(Decoding.names()))
        if unknown:
            raise TypeError(f"caption() got an unknown setting {unknown[0]!r}: the decoding settings are "
                            f"{', '.join(Decoding.names())}")
        caps = {"max_gen_len": (self.max_gen_len, "load()'s max_gen_len, which sized the KV cache")}
        # Read as the server reads a request's settings: numbers (or numbers as text), None for the default.
        return Decoding.from_values(given, {"max_gen_len": self.max_gen_len}, caps)

    def pixels(self, images: Sequence[ImageLike], opened: OpenedCaptioner) -> List[torch.Tensor]:
        """Each image as the captioner's encoder takes it (a tensor: checked, as given)."""
        from PIL import Image

        out = []
        shape = opened.input_shape  # (computed once per captioner)
        for i, im in enumerate(images):
            if torch.is_tensor(im):
                if tuple(im.shape[-3:]) != shape or im.dim() not in (3, 4):
                    raise UserError(f"image {i} is a tensor of shape {tuple(im.shape)}: this captioner takes "
                                    f"{shape} (or N x {shape}), as its preprocess makes them: "
                                    f"cap.opened[name].preprocess(pil_image)")
                if not torch.isfinite(im).all():
                    raise UserError(f"image {i} is a tensor with NaN or infinite values: give the preprocessed pixels of an image")
                out += list(im) if im.dim() == 4 else [im]
                continue
            where = f"image {i}" if not isinstance(im, (str, os.PathLike)) else os.fspath(im)
            try:
                if isinstance(im, (str, os.PathLike)):
                    pil = open_rgb(os.fspath(im))
                elif isinstance(im, (bytes, bytearray, memoryview)):
                    pil = open_rgb(io.BytesIO(bytes(im)))
                elif isinstance(im, Image.Image):
                    pil = im.convert("RGB")
                else:
                    raise TypeError(f"{where} is a {type(im).__name__}: give a file path, a PIL image, the bytes of an "
                                    f"image file, or a preprocessed tensor")
            except (OSError, ValueError, SyntaxError) as e:
                raise UserError(f"{where} is not an image that can be read ({type(e).__name__}: {e})") from None
            out.append(opened.preprocess(pil))
        if not out:
            raise UserError("no images to caption")
        return out  # one shape: each tensor was checked against it, each file preprocessed to it
