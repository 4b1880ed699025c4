"""The trainable part: CLIP features to LLaMA prefix embeddings.

pooled features (B, D):    one vector to `prefix_len` embeddings of LLaMA's width (ClipCap).
patch features (B, N, W):  each patch token to one embedding, so prefix_len = N (LLaVA).
`linear` is one matrix; `mlp` is Linear -> GELU -> Linear.
"""

from typing import Optional

import torch
from torch import nn

from .errors import UserError

PROJECTIONS = ("linear", "mlp")


class Projection(nn.Module):
    def __init__(self, kind: str, feature: str, feature_shape, llama_dim: int, prefix_len: int = 10,
                 hidden: Optional[int] = None):
        super().__init__()
        if kind not in PROJECTIONS:
            raise UserError(f"--projection {kind!r} must be one of {PROJECTIONS}")
        self.kind, self.feature, self.llama_dim = kind, feature, llama_dim
        if feature == "pooled":
            if prefix_len < 1:
                raise UserError(f"--prefix_len must be at least 1, got {prefix_len}")
            self.prefix_len = prefix_len
            in_dim, out_dim = feature_shape[-1], prefix_len * llama_dim
        else:
            self.prefix_len = feature_shape[0]
            in_dim, out_dim = feature_shape[-1], llama_dim
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            h = hidden or llama_dim
            self.net = nn.Sequential(nn.Linear(in_dim, h), nn.GELU(), nn.Linear(h, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features to prefix embeddings (B, prefix_len, llama_dim), in the projection's dtype."""
        x = self.net(features.to(self.net[0].weight.dtype))
        if self.feature == "pooled":
            x = x.view(x.shape[0], self.prefix_len, self.llama_dim)
        return x
