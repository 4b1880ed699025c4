"""The frozen CLIP image encoder, from OpenAI's `clip` package.

Two kinds of features:
  pooled  CLIP's image embedding, one vector per image (ClipCap);            (B, embed_dim)
  patch   the patch tokens after a chosen transformer block, the penultimate
          by default, without the CLS token (LLaVA);                          (B, grid*grid, width)

`EncoderSpec` is what identifies an encoder's features (the model, the SHA-256 of its file, the
feature kind and layer); feature caches and captioner checkpoints record it and are refused
when it differs.
"""

import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .errors import UserError

FEATURE_KINDS = ("pooled", "patch")


def import_clip():
    """The `clip` package, without the pkg_resources deprecation warning it triggers on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import clip
        import clip.model  # noqa: F401  (the CLIP class, for the demo's and tests' stand-ins)
    return clip


def clip_identity(name_or_path: str) -> str:
    """The name of a released model, or the SHA-256 of a local file (so a rebuilt file with the
    same name is told apart)."""
    if os.path.isfile(name_or_path):
        h = hashlib.sha256()
        with open(name_or_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "sha256:" + h.hexdigest()
    return name_or_path


@dataclass(frozen=True)
class EncoderSpec:
    """Which features: CLIP model (name or file), its identity, feature kind, block (patch)."""

    clip_model: str
    identity: str
    feature_kind: str = "pooled"
    clip_layer: Optional[int] = None  # only for patch features

    @classmethod
    def of(cls, clip_model: str, feature_kind: str = "pooled", clip_layer: int = -2) -> "EncoderSpec":
        return cls(clip_model, clip_identity(clip_model), feature_kind, clip_layer if feature_kind == "patch" else None)

    def cache_meta(self) -> dict:
        """The keys a feature cache's meta.json records (names kept from the first version)."""
        return {"clip_model": self.clip_model, "clip_identity": self.identity, "feature": self.feature_kind,
                "clip_layer": str(self.clip_layer)}


def load_clip(name_or_path: str, device="cpu"):
    """clip.load with one-line errors. Returns (model, preprocess)."""
    clip = import_clip()
    if not os.path.isfile(name_or_path) and name_or_path not in clip.available_models():
        raise UserError(
            f"--clip_model {name_or_path!r} is neither a file nor one of {clip.available_models()}"
        )
    try:
        # A TorchScript archive (the format of OpenAI's files) runs code when loaded: only use
        # CLIP files from sources you trust, as with any TorchScript model.
        with warnings.catch_warnings():  # torch.jit's deprecation notices, on every load
            warnings.simplefilter("ignore", FutureWarning)
            model, preprocess = clip.load(name_or_path, device=device, jit=False)
    except Exception as e:
        where = "a local file" if os.path.isfile(name_or_path) else "the name (download failed; offline?)"
        raise UserError(
            f"cannot load CLIP model {name_or_path} from {where}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
            f"- pass a TorchScript CLIP file such as OpenAI's ViT-B-32.pt"
        ) from None
    return model, preprocess


class ClipEncoder(nn.Module):
    """Frozen CLIP vision tower: eval mode, no gradients, CLIP's own preprocessing."""

    def __init__(self, spec: EncoderSpec, device="cpu"):
        super().__init__()
        model, self.preprocess = load_clip(spec.clip_model, device)
        self.visual = model.visual  # the text tower is not needed
        del model
        self.visual.requires_grad_(False).eval()
        n_blocks = len(self.visual.transformer.resblocks)
        # The block count is only known once the model is loaded: this check cannot live in a config.
        if spec.feature_kind == "patch" and not (-n_blocks <= spec.clip_layer < n_blocks):
            raise UserError(f"--clip_layer {spec.clip_layer} is outside the {n_blocks} blocks of {spec.clip_model}")
        self.spec = spec

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    @property
    def feature_shape(self) -> Tuple[int, ...]:
        v = self.visual
        if self.spec.feature_kind == "pooled":
            return (v.output_dim,)
        grid = v.input_resolution // v.conv1.kernel_size[0]
        return (grid * grid, v.conv1.out_channels)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, R, R) to float32 features."""
        images = images.to(self.visual.conv1.weight.device, self.dtype)
        if self.spec.feature_kind == "pooled":
            return self.visual(images).float()
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype))
        x = x.permute(1, 0, 2)  # CLIP's blocks take (L, N, D)
        blocks = v.transformer.resblocks
        for block in blocks[: self.spec.clip_layer % len(blocks) + 1]:
            x = block(x)
        return x.permute(1, 0, 2)[:, 1:].float()
