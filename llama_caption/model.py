"""LLaMA (v1, and the Llama 2 `params.json` extras) on fairscale's model-parallel layers.

Parameter names and shapes are those of Meta's `consolidated.XX.pth` shards, so the released
files load with strict key checking. The module knows nothing about launching: the caller picks
device and dtype, and builds the KV cache explicitly (`Transformer.new_cache`) when generating.

One forward serves training and generation: it takes token ids or embeddings, returns logits for
every position (or only the last, for decoding), and is differentiable with respect to its input
embeddings, which is how the image prefix is trained while every LLaMA weight stays frozen.
"""

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel import mappings as fs_mappings
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # Llama 2 grouped-query attention; None means n_heads
    vocab_size: int = -1  # Meta's params.json says -1: the tokenizer decides
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    max_batch_size: int = 32

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """Fill from a `params.json` dict; unknown keys are ignored, as Meta's own loader does."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known}
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        # LLaMA's rule: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of`.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def param_shapes(args: ModelArgs) -> dict:
    """The full (unsharded) shape of every parameter, keyed by Meta's names."""
    d, hd, v, h = args.dim, args.head_dim, args.vocab_size, args.hidden_dim
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (h, d),
            p + "feed_forward.w2.weight": (d, h),
            p + "feed_forward.w3.weight": (h, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    return shapes


def shard_dim(name: str) -> Optional[int]:
    """The dimension along which Meta's model-parallel shards split a parameter (None: replicated)."""
    leaf = name.split(".")[-2]
    if leaf in ("wq", "wk", "wv", "w1", "w3", "output"):
        return 0  # ColumnParallelLinear: output features
    if leaf in ("wo", "w2", "tok_embeddings"):
        return 1  # RowParallelLinear: input features; ParallelEmbedding: embedding width
    return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 so fp16 activations do not overflow in the mean of squares.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_rotation(head_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Unit complex numbers e^(i * position * theta^(-2k/head_dim)) for integer positions of any
    shape: (..., head_dim/2), complex64."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    ang = positions.float()[..., None] * inv
    return torch.polar(torch.ones_like(ang), ang)


def apply_rope(x, rot):
    """Rotate consecutive pairs (x[2k], x[2k+1]) as complex numbers, Meta's convention.

    x: (B, T, H, hd); rot: (B or 1, T, hd/2) complex.
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot[:, :, None, :]).flatten(-2).type_as(x)


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A fairscale parallel linear layer.

    With model-parallel size 1 its communication wrappers (autograd functions that do nothing on
    one rank) are skipped, which matters when decoding one token at a time is bound by kernel-
    launch overhead. When `Transformer.pack_weights` has given the layer a oneDNN copy of its
    weight and no gradient is needed, the product runs on that copy, with the layer's own
    communication (gather for a column-parallel output, all-reduce for a row-parallel one).
    """
    packed = getattr(layer, "packed_weight", None)
    if packed is not None and not (torch.is_grad_enabled() and x.requires_grad):
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
        if fs_init.get_model_parallel_world_size() > 1:
            if isinstance(layer, RowParallelLinear):
                y = fs_mappings.reduce_from_model_parallel_region(y)
            elif layer.gather_output:
                y = fs_mappings.gather_from_model_parallel_region(y)
        return y
    if fs_init.get_model_parallel_world_size() == 1:
        return F.linear(x, layer.weight)
    return layer(x)


CAUSAL = "causal"


def fp32_attention(q: torch.Tensor) -> bool:
    """Whether to run attention in fp32: bf16 on a CPU when a gradient will flow through it.

    The CPU's bf16 SDPA backward is far slower than its fp32 one (a training step of the demo's
    stand-in LLaMA in bf16 took 46 ms with it and 31 ms with fp32 attention); its bf16 forward is
    as fast as fp32, so decoding keeps bf16.
    """
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()
            and q.requires_grad)


class KVCache(nn.Module):
    """Keys and values of one layer for every slot of the generation window, (B, H_kv, S, hd)."""

    def __init__(self, batch: int, max_seq_len: int, kv_heads: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start: int, k, v):
        end = start + k.shape[2]
        b = k.shape[0]
        self.k[:b, :, start:end] = k
        self.v[:b, :, start:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.head_dim = args.head_dim
        d, hd = args.dim, args.head_dim
        self.wq = ColumnParallelLinear(d, args.n_heads * hd, bias=False, gather_output=False)
        self.wk = ColumnParallelLinear(d, args.kv_heads * hd, bias=False, gather_output=False)
        self.wv = ColumnParallelLinear(d, args.kv_heads * hd, bias=False, gather_output=False)
        self.wo = RowParallelLinear(args.n_heads * hd, d, bias=False, input_is_parallel=True)

    def forward(self, x, rot, mask, cache: Optional[KVCache], start_pos: int):
        """mask: a boolean attention mask, None (attend to every key), or CAUSAL (queries and keys
        are the same slots 0..T-1: SDPA's causal kernel, which skips the masked half)."""
        bsz, seqlen, _ = x.shape
        q = linear(self.wq, x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = linear(self.wk, x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = linear(self.wv, x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        causal = mask is CAUSAL
        dtype = q.dtype
        if fp32_attention(q):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else mask, is_causal=causal,
            enable_gqa=self.n_local_kv_heads != self.n_local_heads,
        ).to(dtype)
        return linear(self.wo, out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h = args.hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, h, bias=False, gather_output=False)
        self.w2 = RowParallelLinear(h, args.dim, bias=False, input_is_parallel=True)
        self.w3 = ColumnParallelLinear(args.dim, h, bias=False, gather_output=False)

    def forward(self, x):
        return linear(self.w2, F.silu(linear(self.w1, x)) * linear(self.w3, x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rot, mask, cache, start_pos):
        h = x + self.attention(self.attention_norm(x), rot, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


@contextmanager
def skip_weight_init():
    """Build fairscale layers without initialising their weights.

    fairscale initialises each weight, and with model parallelism it first builds the full
    master weight on every rank. A checkpoint overwrites all of it (`load_state_dict(...,
    assign=True)`), so `checkpoint.load_llama` builds inside this context and under
    `torch.device("meta")`: nothing is computed and no weight memory is touched before loading.
    """
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


class Transformer(nn.Module):
    """LLaMA. Weights come from a checkpoint: see `skip_weight_init` and `checkpoint.load_llama`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (from the tokenizer) before building")
        mp = fs_init.get_model_parallel_world_size()
        if args.n_heads % mp or args.kv_heads % mp:
            raise ValueError(f"model-parallel size {mp} must divide n_heads={args.n_heads} and n_kv_heads={args.kv_heads}")
        self.args = args
        self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False)

    @property
    def device(self):
        return self.norm.weight.device

    @property
    def dtype(self):
        return self.norm.weight.dtype

    def linear_layers(self) -> List[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]

    def pack_weights(self) -> bool:
        """Give every linear layer a copy of its weight in oneDNN's blocked layout, used when no
        gradient is needed (decoding). Only on a CPU, for fp32 and bf16: there MKL's GEMM
        re-packs the weight at every call, which at decoding's few rows per call costs more than
        the product (the 32000-word output layer at 32 rows runs 2-3x faster packed). Costs one
        extra copy of the weights in memory; call after the model has its final device and dtype.
        Returns whether the weights were packed."""
        if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16) \
                or not onednn_packing_available():
            return False
        layers = self.linear_layers()
        try:
            packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach()) for m in layers]
        except RuntimeError:  # a oneDNN build without this layout (e.g. some ARM builds): stay plain
            return False
        for m, w in zip(layers, packed):
            m.packed_weight = w
        return True

    def unpack_weights(self) -> None:
        """Drop the packed copies made by `pack_weights`."""
        for m in self.linear_layers():
            m.__dict__.pop("packed_weight", None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) to input embeddings (B, T, dim)."""
        if fs_init.get_model_parallel_world_size() == 1:
            return F.embedding(tokens, self.tok_embeddings.weight)
        return self.tok_embeddings(tokens)

    def new_cache(self, batch_size: int, max_seq_len: Optional[int] = None) -> List[KVCache]:
        """Allocate the KV cache for generation, on the model's device and dtype."""
        n = max_seq_len or self.args.max_seq_len
        kvh = self.layers[0].attention.n_local_kv_heads
        return nn.ModuleList(
            KVCache(batch_size, n, kvh, self.args.head_dim, self.device, self.dtype) for _ in self.layers
        )

    def forward(
        self,
        tokens: Optional[torch.Tensor] = None,
        *,
        embeddings: Optional[torch.Tensor] = None,
        start_pos: int = 0,
        cache: Optional[List[KVCache]] = None,
        key_valid: Optional[torch.Tensor] = None,
        last_only: bool = False,
        keep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32; (B, 1, vocab) when `last_only`; (N, vocab) for the N
        positions where the boolean (B, T) `keep` is True (a loss needs no logits elsewhere, and
        the output layer is the widest product of the model).

        tokens (B, T) or embeddings (B, T, dim), exactly one. With a cache, the inputs occupy
        slots start_pos .. start_pos+T-1 of it. `key_valid` (B, start_pos+T), True for real
        slots, masks left padding out of attention and shifts rotary positions so every sequence
        starts at position 0; without it positions are the slot indices.
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens and embeddings")
        h = self.embed(tokens) if tokens is not None else embeddings.to(self.dtype)
        bsz, seqlen, _ = h.shape
        end = start_pos + seqlen
        dev = h.device
        if key_valid is None:
            positions = torch.arange(start_pos, end, device=dev)[None]
            if seqlen == 1:
                mask = None  # one query attends to every cached slot
            elif start_pos == 0:
                mask = CAUSAL
            else:
                slots = torch.arange(end, device=dev)
                mask = slots[None, :] <= positions[0, :, None]  # (T, end)
        else:
            key_valid = key_valid[:, :end].to(dev)
            positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, start_pos:end]
            slots = torch.arange(end, device=dev)
            q_slots = torch.arange(start_pos, end, device=dev)
            causal = slots[None, :] <= q_slots[:, None]
            # Padding slots see themselves, so no row of the softmax is empty (they are never read).
            own = slots[None, :] == q_slots[:, None]
            mask = (causal[None] & (key_valid[:, None, :] | own[None]))[:, None]  # (B, 1, T, end)
        rot = rope_rotation(self.args.head_dim, positions, self.args.rope_theta)
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, mask, None if cache is None else cache[i], start_pos)
        if last_only:
            h = h[:, -1:]
        elif keep is not None:
            h = h[keep.to(dev)]
        return linear(self.output, self.norm(h)).float()
