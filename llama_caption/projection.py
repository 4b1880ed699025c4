"""The trainable part: CLIP features to LLaMA prefix embeddings.

pooled features (B, D):    one vector to `prefix_len` embeddings of LLaMA's width (ClipCap).
patch features (B, N, W):  `linear`/`mlp` map each patch token to one embedding, so there are N
                           prefix tokens (LLaVA).
`linear` is one matrix; `mlp` is Linear -> GELU -> Linear. `transformer` is a mapper in the
spirit of ClipCap's transformer mapper and Flamingo's resampler: `prefix_len` learned queries
and the feature tokens (the pooled vector made into `prefix_len` tokens, or the patch tokens)
pass through `mapper_layers` pre-norm transformer layers at their own width, and the queries'
outputs are mapped to LLaMA's width. With patch features it gives `prefix_len` tokens however
large the grid, so the frozen LLaMA's cost does not grow with the image. The sizes come from a
`captioner.CaptionerSpec`, which also holds the prefix-length rule.
"""

import torch
from torch import nn

PROJECTIONS = ("linear", "mlp", "transformer")


class Mapper(nn.Module):
    """Learned queries + feature tokens -> transformer layers -> the queries' outputs -> LLaMA width."""

    def __init__(self, pooled: bool, feature_dim: int, feature_tokens: int, llama_dim: int, prefix_len: int,
                 width: int, layers: int):
        super().__init__()
        self.pooled, self.prefix_len, self.width = pooled, prefix_len, width
        n_in = prefix_len if pooled else feature_tokens
        self.inp = nn.Linear(feature_dim, width * (prefix_len if pooled else 1))
        self.queries = nn.Parameter(torch.randn(prefix_len, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(n_in + prefix_len, width) * 0.02)
        heads = width // 64 if width % 64 == 0 else 1
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, llama_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.inp(features)
        if self.pooled:
            x = x.view(x.shape[0], self.prefix_len, self.width)
        x = torch.cat([x, self.queries.expand(x.shape[0], -1, -1)], 1) + self.pos
        x = self.blocks(x)
        return self.out(self.norm(x[:, -self.prefix_len:]))


class Projection(nn.Module):
    def __init__(self, kind: str, pooled: bool, feature_dim: int, llama_dim: int, prefix_len: int, hidden: int,
                 feature_tokens: int = 0, mapper_width: int = 512, mapper_layers: int = 4):
        super().__init__()
        if kind not in PROJECTIONS:
            raise ValueError(f"projection {kind!r} is not one of {PROJECTIONS}")
        self.kind, self.pooled, self.prefix_len, self.llama_dim = kind, pooled, prefix_len, llama_dim
        if kind == "transformer":
            self.net = Mapper(pooled, feature_dim, feature_tokens, llama_dim, prefix_len, mapper_width, mapper_layers)
            return
        out_dim = prefix_len * llama_dim if pooled else llama_dim
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(feature_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features to prefix embeddings (B, prefix_len, llama_dim), in the projection's dtype."""
        x = self.net(features.to(next(self.parameters()).dtype))
        if self.pooled and self.kind != "transformer":
            x = x.view(x.shape[0], self.prefix_len, self.llama_dim)
        return x
