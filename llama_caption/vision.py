"""The frozen CLIP image encoder, from OpenAI's `clip` package.

Two kinds of features:
  pooled  CLIP's image embedding, one vector per image (ClipCap);            (B, embed_dim)
  patch   the patch tokens after a chosen transformer block, the penultimate
          by default, without the CLS token (LLaVA);                          (B, grid*grid, width)
"""

import hashlib
import os
import warnings
from typing import Optional

import torch
from torch import nn

from .errors import UserError

FEATURE_KINDS = ("pooled", "patch")


def clip_identity(name_or_path: str) -> str:
    """What a feature cache records about the CLIP model: the name of a released model, or the
    SHA-256 of a local file (so a rebuilt file with the same name is told apart)."""
    if os.path.isfile(name_or_path):
        h = hashlib.sha256()
        with open(name_or_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "sha256:" + h.hexdigest()
    return name_or_path


def load_clip(name_or_path: str, device="cpu"):
    """clip.load with one-line errors. Returns (model, preprocess)."""
    with warnings.catch_warnings():  # clip imports pkg_resources, which warns that it is deprecated
        warnings.simplefilter("ignore", UserWarning)
        import clip

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

    def __init__(self, name_or_path: str, device="cpu", feature: str = "pooled", layer: int = -2):
        super().__init__()
        if feature not in FEATURE_KINDS:
            raise UserError(f"--feature {feature!r} must be one of {FEATURE_KINDS}")
        model, self.preprocess = load_clip(name_or_path, device)
        self.visual = model.visual  # the text tower is not needed
        del model
        self.visual.requires_grad_(False).eval()
        n_blocks = len(self.visual.transformer.resblocks)
        if feature == "patch" and not (-n_blocks <= layer < n_blocks):
            raise UserError(f"--clip_layer {layer} is outside the {n_blocks} blocks of {name_or_path}")
        self.name = name_or_path
        self.feature = feature
        self.layer = layer if feature == "patch" else None
        self.identity = clip_identity(name_or_path)

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    @property
    def resolution(self) -> int:
        return self.visual.input_resolution

    @property
    def feature_shape(self):
        v = self.visual
        if self.feature == "pooled":
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
        if self.feature == "pooled":
            return self.visual(images).float()
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype))
        x = x.permute(1, 0, 2)  # CLIP's blocks take (L, N, D)
        blocks = v.transformer.resblocks
        stop = self.layer % len(blocks) + 1
        for block in blocks[:stop]:
            x = block(x)
        return x.permute(1, 0, 2)[:, 1:].float()


def features_meta(encoder: ClipEncoder) -> dict:
    """What a feature cache records about the encoder that made it, and checks on reading."""
    return {"clip_model": encoder.name, "clip_identity": encoder.identity, "feature": encoder.feature,
            "clip_layer": str(encoder.layer)}


def build_tiny_clip(path: str, embed_dim: int = 64, width: int = 64, layers: int = 2, patch: int = 8,
                    resolution: int = 32, seed: int = 0, model: Optional[nn.Module] = None):
    """Save a small `clip.model.CLIP` as a TorchScript file that `clip.load(path)` reads.

    Widths must be multiples of 64: clip.model.build_model infers head counts as width // 64.
    `model` may be an already trained CLIP (the demo's stand-in); else a random one is made.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from clip.model import CLIP

    from .fileio import atomic_path

    if model is None:
        torch.manual_seed(seed)
        model = CLIP(embed_dim=embed_dim, image_resolution=resolution, vision_layers=layers,
                     vision_width=width, vision_patch_size=patch, context_length=16, vocab_size=49408,
                     transformer_width=64, transformer_heads=1, transformer_layers=1)
    model = model.float().eval()
    res = model.visual.input_resolution
    image = torch.zeros(1, 3, res, res)
    text = torch.zeros(1, model.context_length, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    with atomic_path(path) as tmp:
        traced.save(tmp)
    return path
