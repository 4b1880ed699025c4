"""LLaMA (1, 2 and 3.x) on fairscale's model-parallel layers.

Parameter names and shapes are those of Meta's `consolidated.XX.pth` shards, so the released
files load with strict key checking. The module knows nothing about launching: the caller picks
device and dtype, and builds the KV cache explicitly (`Transformer.new_cache`) when generating.

One forward serves training and generation: it takes token ids or embeddings, returns logits for
every position (or only the last, for decoding), and is differentiable with respect to its input
embeddings, which is how the image prefix is trained while every LLaMA weight stays frozen.

At model-parallel size 1 the layers are plain `nn.Linear`/`nn.Embedding` (fairscale's wrappers
only add per-call overhead there); above 1 they are fairscale's. Either way the parameter names
are Meta's. `pack_weights` swaps the linear layers for `PackedLinear` for CPU decoding.

The families differ in three places, all in `ModelArgs`: Llama 2's grouped-query attention
(`n_kv_heads`), Llama 3's rotary base (`rope_theta` 500000) and Llama 3.1+'s frequency scaling
(`rope_scaling`, see `rope_frequencies`), and how model-parallel shards split the token embedding
(`embedding_split`: Llama 1/2 on its width, Llama 3 on the vocabulary).
"""

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import List, NamedTuple, Optional

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
    VocabParallelEmbedding,
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
    max_seq_len: int = 2048  # the KV-cache window; LLaMA 1 was trained on 2048 tokens
    use_scaled_rope: bool = False  # Llama 3.1+ params.json: the "llama3" frequency scaling
    # The scaling's numbers (keys of LLAMA3_SCALING); None with use_scaled_rope means Meta's.
    rope_scaling: Optional[dict] = None
    embedding_split: str = "width"  # how model-parallel shards split tok_embeddings: width or vocab
    intermediate_size: Optional[int] = None  # the SwiGLU width when a config states it (Hugging Face)

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """Fill from a `params.json` dict; unknown keys are ignored, as Meta's own loader does."""
        known = {f.name for f in fields(cls)} - {"embedding_split"}  # a loader's finding, not a param
        kwargs = {k: v for k, v in params.items() if k in known}
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def scaling(self) -> Optional[dict]:
        """The llama3 frequency scaling in use, or None."""
        if self.rope_scaling is not None:
            return self.rope_scaling
        return dict(LLAMA3_SCALING) if self.use_scaled_rope else None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        # LLaMA's rule: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of`.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# Meta's `apply_scaling` (llama-models, models/llama3/model.py) fixes these for every Llama 3.1+
# checkpoint whose params.json says use_scaled_rope; Hugging Face configs state their own.
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
EMBEDDING_SPLITS = ("width", "vocab")


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


def shard_dim(name: str, embedding_split: str = "width") -> Optional[int]:
    """The dimension along which Meta's model-parallel shards split a parameter (None: replicated)."""
    leaf = name.split(".")[-2]
    if leaf == "tok_embeddings":  # Llama 1/2 ParallelEmbedding: the width; Llama 3 VocabParallelEmbedding
        return 0 if embedding_split == "vocab" else 1
    if leaf in ("wq", "wk", "wv", "w1", "w3", "output"):
        return 0  # ColumnParallelLinear: output features
    if leaf in ("wo", "w2"):
        return 1  # RowParallelLinear: input features
    return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 so fp16 activations do not overflow in the mean of squares.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """The rotary frequencies theta^(-2k/head_dim), k < head_dim/2 (fp32), with Llama 3.1's
    scaling when the model has it: wavelengths longer than original_context/low_freq_factor are
    stretched by `factor`, shorter than original_context/high_freq_factor kept, and those between
    blended linearly in original_context/wavelength."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
    scaling = args.scaling
    if scaling is None:
        return freqs
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / freqs
    smooth = ((context / wavelen - low) / (high - low)).clamp(0, 1)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return torch.where(wavelen > context / low, freqs / factor,
                       torch.where(wavelen < context / high, freqs, blended))


def rope_rotation(freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers e^(i * position * freq) for integer positions of any shape:
    (..., head_dim/2), complex64."""
    ang = positions.float()[..., None] * freqs.to(positions.device)
    return torch.polar(torch.ones_like(ang), ang)


def apply_rope(x, rot):
    """Rotate consecutive pairs (x[2k], x[2k+1]) as complex numbers, Meta's convention.

    x: (B, T, H, hd); rot: (B or 1, T, hd/2) complex.
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot[:, :, None, :]).flatten(-2).type_as(x)


class AttentionLayout(NamedTuple):
    """Where each query sits and what it may see: rotary positions, and either SDPA's causal
    kernel (`causal`), an explicit boolean mask, or nothing (one query sees every key)."""

    positions: torch.Tensor  # (1 or B, T)
    mask: Optional[torch.Tensor]  # (T, S) or (B, 1, T, S), True where a query may attend
    causal: bool


class SlotRows(NamedTuple):
    """Transformer.decode_slots's B decoding rows: each one's slot (= rotary position), rotation
    and mask of the slots it sees (B, 1, 1, window)."""

    at: torch.Tensor
    rot: torch.Tensor
    mask: torch.Tensor


class PromptRows(NamedTuple):
    """Transformer.decode_slots's K prompts: the cache rows they fill and their rotation (1, L, hd/2)."""

    rows: torch.Tensor
    rot: torch.Tensor


def attention_layout(start_pos: int, seqlen: int, key_valid: Optional[torch.Tensor], device) -> AttentionLayout:
    """The layout of queries in slots start_pos .. start_pos+seqlen-1 of a window.

    key_valid (B, >= start_pos+seqlen), True for real slots, masks left padding out and shifts
    rotary positions so every sequence starts at position 0; without it positions are slots.
    """
    end = start_pos + seqlen
    if key_valid is None:
        positions = torch.arange(start_pos, end, device=device)[None]
        if seqlen == 1:
            return AttentionLayout(positions, None, False)
        if start_pos == 0:  # queries and keys are the same slots: the causal kernel skips half
            return AttentionLayout(positions, None, True)
        slots = torch.arange(end, device=device)
        return AttentionLayout(positions, slots[None, :] <= positions[0, :, None], False)
    key_valid = key_valid[:, :end].to(device)
    positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, start_pos:end]
    slots = torch.arange(end, device=device)
    q_slots = torch.arange(start_pos, end, device=device)
    causal = slots[None, :] <= q_slots[:, None]
    # Padding slots see themselves, so no row of the softmax is empty (they are never read).
    own = slots[None, :] == q_slots[:, None]
    return AttentionLayout(positions, (causal[None] & (key_valid[:, None, :] | own[None]))[:, None], False)


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def column_linear(in_features: int, out_features: int, gather_output: bool = False) -> nn.Module:
    """Output features split over model-parallel ranks (Meta's wq, wk, wv, w1, w3, output)."""
    if fs_init.get_model_parallel_world_size() == 1:
        return nn.Linear(in_features, out_features, bias=False)
    return ColumnParallelLinear(in_features, out_features, bias=False, gather_output=gather_output)


def row_linear(in_features: int, out_features: int) -> nn.Module:
    """Input features split over model-parallel ranks, outputs summed (Meta's wo, w2)."""
    if fs_init.get_model_parallel_world_size() == 1:
        return nn.Linear(in_features, out_features, bias=False)
    return RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True)


LINEAR_TYPES = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


class PackedLinear(nn.Module):
    """A linear layer that, when no gradient is needed, multiplies by a copy of its weight packed
    in oneDNN's blocked layout (CPU decoding: MKL's GEMM re-packs the weight at every call, which
    at decoding's few rows costs more than the product). With a gradient it calls the original
    layer. The weight Parameter is the original's, so names and state dict do not change."""

    def __init__(self, layer: nn.Module, packed: torch.Tensor):
        super().__init__()
        self.weight = layer.weight
        self.__dict__["original"] = layer  # not a submodule: its weight is already ours
        self.__dict__["packed"] = packed  # not a buffer: .to() must not touch a oneDNN tensor
        self.reduce = isinstance(layer, RowParallelLinear)
        self.gather = isinstance(layer, ColumnParallelLinear) and layer.gather_output

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return self.original(x)
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")
        if self.reduce:
            return fs_mappings.reduce_from_model_parallel_region(y)
        if self.gather:
            return fs_mappings.gather_from_model_parallel_region(y)
        return y


def fp32_attention(q: torch.Tensor) -> bool:
    """Whether to run attention in fp32: bf16 on a CPU when a gradient will flow through it.

    The CPU's bf16 SDPA backward is far slower than its fp32 one (the README has the figures);
    its bf16 forward is as fast as fp32, so decoding keeps bf16.
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

    def update(self, start, k, v):
        """Write k, v (B, H_kv, T, hd) at slots start..start+T-1; returns the keys and values of
        slots 0..start+T-1. `start` a one-element tensor (the static decoder): T is 1, the write
        is an index_copy_ and the whole window comes back, so every shape stays fixed."""
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start, k)
            self.v.index_copy_(2, start, v)
            return self.k, self.v
        end = start + k.shape[2]
        b = k.shape[0]
        self.k[:b, :, start:end] = k
        self.v[:b, :, start:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the cache rows `rows` (beam search: each beam continues from its source beam)."""
        self.k.copy_(self.k.index_select(0, rows))
        self.v.copy_(self.v.index_select(0, rows))

    def write_slots(self, at: torch.Tensor, k, v):
        """Continuous batching: write row b's k, v (B, H_kv, 1, hd) at slot at[b] of cache row b
        (a scatter: the shapes stay fixed whatever the slots); returns the keys and values of
        rows 0..B-1, whole window."""
        index = at.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        return self.k[:k.shape[0]], self.v[:v.shape[0]]

    def write_prompts(self, rows: torch.Tensor, k, v) -> None:
        """Continuous batching's prefill: k, v (K, H_kv, L, hd) into slots 0..L-1 of cache rows
        `rows` (K,)."""
        self.k[:, :, :k.shape[2]].index_copy_(0, rows, k)
        self.v[:, :, :v.shape[2]].index_copy_(0, rows, v)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.head_dim = args.head_dim
        d, hd = args.dim, args.head_dim
        self.wq = column_linear(d, args.n_heads * hd)
        self.wk = column_linear(d, args.kv_heads * hd)
        self.wv = column_linear(d, args.kv_heads * hd)
        self.wo = row_linear(args.n_heads * hd, d)

    def forward(self, x, rot, layout: AttentionLayout, cache: Optional[KVCache], start_pos: int):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        dtype = q.dtype
        if fp32_attention(q):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=layout.mask, is_causal=layout.causal,
            enable_gqa=self.n_local_kv_heads != self.n_local_heads,
        ).to(dtype)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def forward_slots(self, x, rows: SlotRows, prompts: Optional[PromptRows], cache: KVCache):
        """Transformer.decode_slots's attention: x (B + K*L, dim), the slots' B tokens, then the
        K prompts' tokens; one product per weight for all of them, attention apart."""
        n, hd = x.shape[0], self.head_dim
        q = self.wq(x).view(n, self.n_local_heads, hd)
        k = self.wk(x).view(n, self.n_local_kv_heads, hd)
        v = self.wv(x).view(n, self.n_local_kv_heads, hd)
        b = rows.at.shape[0]
        parts = [self.attend_slots(q[:b, None], k[:b, None], v[:b, None], rows, cache)]
        if prompts is not None:
            n_prompts = prompts.rows.shape[0]
            parts.append(self.attend_prompts(*(t[b:].view(n_prompts, -1, *t.shape[1:]) for t in (q, k, v)), prompts,
                                             cache))
        return self.wo(torch.cat([p.reshape(-1, self.n_local_heads * hd) for p in parts]))

    def attend_slots(self, q, k, v, rows: SlotRows, cache: KVCache):
        """One token per row (B, 1, H, hd), written at its row's own slot; attends over its row's window."""
        q, k = apply_rope(q, rows.rot), apply_rope(k, rows.rot)
        k, v = cache.write_slots(rows.at, k.transpose(1, 2), v.transpose(1, 2))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=rows.mask,
                                             enable_gqa=self.n_local_kv_heads != self.n_local_heads)
        return out.transpose(1, 2)

    def attend_prompts(self, q, k, v, prompts: PromptRows, cache: KVCache):
        """Whole prompts (K, L, H, hd) from slot 0, causal among themselves, written into their rows."""
        q, k = apply_rope(q, prompts.rot), apply_rope(k, prompts.rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cache.write_prompts(prompts.rows, k, v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.n_local_kv_heads != self.n_local_heads)
        return out.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h = args.hidden_dim
        self.w1 = column_linear(args.dim, h)
        self.w2 = row_linear(h, args.dim)
        self.w3 = column_linear(args.dim, h)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rot, layout, cache, start_pos):
        h = x + self.attention(self.attention_norm(x), rot, layout, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_slots(self, x, rows, prompts, cache):
        h = x + self.attention.forward_slots(self.attention_norm(x), rows, prompts, cache)
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
    resets = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    for cls in resets:  # at MP 1 (plain layers) their init on the meta device costs a 2 s import
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original
        for cls, reset in resets.items():
            cls.reset_parameters = reset


class Transformer(nn.Module):
    """LLaMA. Weights come from a checkpoint: see `skip_weight_init` and `checkpoint.load_llama`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (from the tokenizer) before building")
        mp = fs_init.get_model_parallel_world_size()
        if args.n_heads % mp or args.kv_heads % mp:
            raise ValueError(f"model-parallel size {mp} must divide n_heads={args.n_heads} and n_kv_heads={args.kv_heads}")
        if args.embedding_split not in EMBEDDING_SPLITS:
            raise ValueError(f"embedding_split must be one of {EMBEDDING_SPLITS}, got {args.embedding_split!r}")
        self.args = args
        if mp == 1:
            self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        elif args.embedding_split == "vocab":
            self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim)
        else:
            self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = column_linear(args.dim, args.vocab_size, gather_output=True)
        self.rope_freqs = None  # computed on first use, on the inputs' device (not a buffer: never saved)

    @property
    def device(self):
        return self.norm.weight.device

    @property
    def dtype(self):
        return self.norm.weight.dtype

    def swap_linears(self, make) -> int:
        """Replace each linear layer `m` by `make(m)` (None: keep); returns how many changed."""
        swaps = []
        for parent in self.modules():
            for name, child in parent.named_children():
                new = make(child)
                if new is not None:
                    swaps.append((parent, name, new))
        for parent, name, new in swaps:
            setattr(parent, name, new)
        return len(swaps)

    def pack_weights(self) -> bool:
        """Swap every linear layer for a `PackedLinear` (oneDNN-packed copy of its weight, used
        when no gradient is needed). Only on a CPU, for fp32 and bf16; costs one extra copy of
        the weights in memory. Call after the model has its final device and dtype.
        Returns whether the weights are packed."""
        if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16) \
                or not onednn_packing_available():
            return False
        try:
            packed = {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach())
                      for m in self.modules() if isinstance(m, LINEAR_TYPES)}
        except RuntimeError:  # a oneDNN build without this layout (e.g. some ARM builds): stay plain
            return False
        self.swap_linears(lambda m: PackedLinear(m, packed[m]) if m in packed else None)
        return bool(packed)  # False when every linear layer is quantized: nothing to pack

    def unpack_weights(self) -> None:
        """Put the original linear layers back (drops the packed copies)."""
        self.swap_linears(lambda m: m.original if isinstance(m, PackedLinear) else None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) to input embeddings (B, T, dim)."""
        return self.tok_embeddings(tokens)

    def new_cache(self, batch_size: int, max_seq_len: Optional[int] = None) -> List[KVCache]:
        """Allocate the KV cache for generation, on the model's device and dtype."""
        n = max_seq_len or self.args.max_seq_len
        kvh = self.layers[0].attention.n_local_kv_heads
        return nn.ModuleList(
            KVCache(batch_size, n, kvh, self.args.head_dim, self.device, self.dtype) for _ in self.layers
        )

    def decode_static(self, tokens: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor,
                      key_mask: torch.Tensor, cache: List[KVCache]) -> torch.Tensor:
        """One decoding step in fixed shapes (static_decode.py): tokens (B,) at window slot
        `slot` (a one-element long tensor), rotary positions (B,), key_mask (B, 1, 1, S) True
        for the slots each row may see. Attends over the whole window S of the cache, so one
        captured graph serves every step. Returns the logits (B, vocab), fp32."""
        h = self.embed(tokens[:, None])
        rot = rope_rotation(self.rope_freqs, positions[:, None])
        layout = AttentionLayout(positions[:, None], key_mask, False)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, rot, layout, layer_cache, slot)
        return self.output(self.norm(h[:, -1])).float()

    def decode_slots(self, tokens: torch.Tensor, at: torch.Tensor, cache: List[KVCache],
                     prompts: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One step of continuous batching (continuous.py) in fixed shapes. Row b of the B slots
        feeds tokens[b] at window slot and rotary position at[b] of cache row b, and attends to
        that row's slots 0..at[b]; and `prompts` (K, L, dim), when given, are prefilled into cache
        rows `rows` (K,), slots 0..L-1, in the same products. The cache has at least B rows.
        Returns the logits (B + K, vocab), fp32: each slot's, then each prompt's last position's."""
        b = tokens.shape[0]
        h = self.embed(tokens)
        slots = torch.arange(cache[0].k.shape[2], device=h.device)
        slot_rows = SlotRows(at, rope_rotation(self.rope_freqs, at[:, None]), (slots <= at[:, None])[:, None, None, :])
        prompt_rows = None
        if prompts is not None:
            k, length = prompts.shape[:2]
            h = torch.cat([h, prompts.reshape(k * length, -1).to(h.dtype)])
            prompt_rows = PromptRows(rows, rope_rotation(self.rope_freqs, slots[None, :length]))
        for layer, layer_cache in zip(self.layers, cache):
            h = layer.forward_slots(h, slot_rows, prompt_rows, layer_cache)
        if prompts is not None:
            h = torch.cat([h[:b], h[b:].view(k, length, -1)[:, -1]])
        return self.output(self.norm(h)).float()

    def forward(
        self,
        tokens: Optional[torch.Tensor] = None,
        *,
        embeddings: Optional[torch.Tensor] = None,
        start_pos: int = 0,
        cache: Optional[List[KVCache]] = None,
        key_valid: Optional[torch.Tensor] = None,
        last_only: bool = False,
        logits_at: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32; (B, 1, vocab) when `last_only`; (N, vocab) for the N
        positions where the boolean (B, T) `logits_at` is True (a loss needs no logits
        elsewhere, and the output layer is the widest product of the model).

        tokens (B, T) or embeddings (B, T, dim), exactly one. With a cache, the inputs occupy
        slots start_pos .. start_pos+T-1 of it. `key_valid`: see `attention_layout`.
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens and embeddings")
        h = self.embed(tokens) if tokens is not None else embeddings.to(self.dtype)
        layout = attention_layout(start_pos, h.shape[1], key_valid, h.device)
        if self.rope_freqs is None or self.rope_freqs.device != h.device:
            self.rope_freqs = rope_frequencies(self.args, h.device)
        rot = rope_rotation(self.rope_freqs, layout.positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, layout, None if cache is None else cache[i], start_pos)
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = h[logits_at.to(h.device)]
        return self.output(self.norm(h)).float()
