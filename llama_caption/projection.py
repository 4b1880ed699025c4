"""The trainable part: CLIP features to LLaMA prefix embeddings.

pooled features (B, D):    one vector to `prefix_len` embeddings of LLaMA's width (ClipCap).
patch features (B, N, W):  each patch token to one embedding, so there are N prefix tokens (LLaVA).
`linear` is one matrix; `mlp` is Linear -> GELU -> Linear. The sizes come from a
`captioner.CaptionerConfig`, which also holds the prefix-length rule.
"""

import torch
from torch import nn

PROJECTIONS = ("linear", "mlp")


class Projection(nn.Module):
    def __init__(self, kind: str, pooled: bool, feature_dim: int, llama_dim: int, prefix_len: int, hidden: int):
        super().__init__()
        if kind not in PROJECTIONS:
            raise ValueError(f"projection {kind!r} is not one of {PROJECTIONS}")
        self.pooled, self.prefix_len, self.llama_dim = pooled, prefix_len, llama_dim
        out_dim = prefix_len * llama_dim if pooled else llama_dim
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(feature_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features to prefix embeddings (B, prefix_len, llama_dim), in the projection's dtype."""
        x = self.net(features.to(self.net[0].weight.dtype))
        if self.pooled:
            x = x.view(x.shape[0], self.prefix_len, self.llama_dim)
        return x
