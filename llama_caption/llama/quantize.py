"""Weight-only quantized frozen LLaMAs: `--quantize none|int8|int4|nf4`.

The LLaMA is frozen, so its weights only carry activations forward and the activations'
gradients back to the prefix. The linear layers of the transformer blocks (attention's
wq/wk/wv/wo and the feed-forward's w1/w2/w3: all but a few percent of the weights) are
quantized one at a time as this rank's slice arrives from the checkpoint (`load_llama`), so a
full-precision copy of the whole model never exists. Under int8 and int4 the output layer (the
vocabulary's logits, read every decoding step: a quarter of a small model's weights) is int8 too,
per row, which moves the logits by parts in a thousand (4-bit output rows would move them ten
times more, so int4 keeps it at 8 bits, as llama.cpp's 4-bit formats keep it above 4). The
embedding and the norms stay in the run's precision, as does a tied output layer (it is the
embedding: quantizing it would add a copy), and nf4's output layer.

- int8: int8 codes per output row with one scale each, multiplied by PyTorch's own fused kernel
  (`aten._weight_int8pack_mm`: the product reads the int8 codes, no float copy of the weight).
- int4: 4-bit codes, two per byte, with a scale and an offset per group of 64 (or 32) inputs,
  multiplied by PyTorch's fused int4 kernels (`aten._weight_int4pack_mm_for_cpu` on a CPU,
  tinygemm's `aten._weight_int4pack_mm` on CUDA), in the kernels' own packed layouts.
- nf4: bitsandbytes' NF4 (`Linear4bit`: 4-bit normal-float codes, one scale per 64 weights, the
  scales quantized again: QLoRA's and LLaVA's `--load-4bit`). It dequantizes for every product.

The fused kernels take bf16 activations (their fp32 and fp16 paths are reference loops, 10 to 30
times slower on a CPU), so an fp32 or fp16 model's activations are rounded to bf16 for these
products only. Scales (and int4's offsets) are rounded to bf16 before the codes are chosen, so
the codes absorb that rounding. Where the fused int8 kernel does not run on the device,
int8 falls back to torchao's `Int8WeightOnlyConfig` (the same per-row scheme, computed eagerly)
with one line saying so; int4 without its kernel is refused in one line (nf4 is the other 4-bit
mode). docs/quantization.md has the measurements behind these choices.

Gradients flow to a layer's input (`QuantizedProduct`): grad_x = grad_y @ W, with W dequantized
a slice at a time during the backward pass and dropped at once (never stored). Each layer keeps
fairscale's model-parallel communication: a column-parallel layer copies its input into the
region (its gradient is all-reduced backwards), a row-parallel one all-reduces its output.
"""

import contextlib
import functools
import logging
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from fairscale.nn.model_parallel import mappings as fs_mappings
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from ..errors import UserError

MODES = ("none", "int8", "int4", "nf4")
LIBRARY = {"int8": "PyTorch int8pack", "int4": "PyTorch int4pack", "nf4": "bitsandbytes"}
FALLBACK_LIBRARY = {"int8": "torchao"}
# Modes whose library's layers the graph decoders (--decoder compile, cuda_graph) do not take.
UNCOMPILED = ("nf4",)
# The block linears of model.py's TransformerBlock, by parameter name ending.
QUANTIZED_SUFFIXES = tuple(f"{part}.weight" for part in
                           ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
# The output layer's mode under each mode that quantizes it (int8's fused kernel; see above).
OUTPUT_MODE = {"int8": "int8", "int4": "int8"}
NF4_BLOCK = 64
INT4_GROUPS = (64, 32)  # inputs per int4 scale and offset: the first that divides a slice's width
KERNEL_DTYPE = torch.bfloat16  # the fused kernels' fast activations
BACKWARD_CHUNK = 1 << 22  # weights dequantized at a time in the backward pass (16 MiB in fp32)


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Both libraries log warnings at import that are not the user's business (torchao: a
    deprecation inside torch.compile's pytree registry; bitsandbytes: an optional CPU kernel
    package that is not installed)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _torchao():
    with _quiet("torch.utils._pytree", "torchao"):
        import torchao.quantization as tq
    return tq


def _bitsandbytes():
    with _quiet("bitsandbytes", "bitsandbytes.backends.cpu.ops"):
        import bitsandbytes as bnb
    return bnb


def is_quantized(name: str) -> bool:
    """Whether the weight called `name` (model.py's names) is a block linear's, quantized in
    every mode."""
    return name.startswith("layers.") and name.endswith(QUANTIZED_SUFFIXES)


@dataclass(frozen=True)
class QuantizePlan:
    """Which weights `--quantize mode` quantizes on one device, and how: the block linears in
    `mode` through `kernel`, the output layer in `output` (None: kept in the run's dtype)."""

    mode: str
    device: torch.device
    dtype: torch.dtype
    kernel: str = "fused"
    output: Optional[str] = None

    def layer_mode(self, name: str) -> Optional[str]:
        """The mode the weight `name` is quantized in (None: kept)."""
        if self.mode == "none":
            return None
        if is_quantized(name):
            return self.mode
        return self.output if name == "output.weight" else None

    def layer(self, layer: nn.Module, name: str, weight: torch.Tensor) -> Optional["QuantizedLinear"]:
        """`layer` (whose weight is `name`) quantized from `weight`, this rank's slice; None where
        the plan keeps it."""
        mode = self.layer_mode(name)
        if mode is None:
            return None
        kernel = self.kernel if mode == self.mode else "fused"
        return QuantizedLinear(layer, weight, mode, self.device, self.dtype, kernel)


def plan(mode: str, device, dtype: torch.dtype, flag: str = "--quantize") -> QuantizePlan:
    """The plan for `mode` on `device` (check_kernels decides the blocks' kernel, or refuses the
    mode in one line). The output layer goes to int8 only where int8's fused kernel runs."""
    device = torch.device(device)
    kernel = check_kernels(mode, device, dtype, flag)
    output = OUTPUT_MODE.get(mode)
    if output and (kernel != "fused" or output != mode and not _fused_runs(output, device, dtype)):
        output = None
    return QuantizePlan(mode, device, dtype, kernel, output)


@functools.lru_cache(maxsize=None)
def _fused_runs(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    return probe(mode, device, dtype, "fused") is None


class QuantizedProduct(torch.autograd.Function):
    """y = x @ W.T through a fused quantized kernel; backwards, grad_x = grad_y @ W with W
    dequantized a slice at a time (`grad_rows`). The weight is frozen: no gradient of its own."""

    @staticmethod
    def forward(ctx, x, weight):  # x (rows, in): the output is no view, so a reduction may write into it
        ctx.weight = weight
        return weight.product(x.to(KERNEL_DTYPE)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return ctx.weight.grad_rows(grad), None


class FusedWeight(nn.Module):
    """A frozen (out, in) weight held as codes that a fused kernel multiplies directly."""

    def forward(self, x):
        """x (..., in) @ W.T, the kernel taking bf16 activations, in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() and x.requires_grad:
            y = QuantizedProduct.apply(rows, self)
        else:
            y = self.product(rows.to(KERNEL_DTYPE)).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Weight(FusedWeight):
    """int8 codes, one scale per output row (symmetric: w ~ code * scale), for
    `aten._weight_int8pack_mm`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.float()
        scales = (w.abs().amax(1) / 127).clamp(min=torch.finfo(KERNEL_DTYPE).tiny).to(KERNEL_DTYPE)
        codes = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales.to(KERNEL_DTYPE))

    def dequantized(self, rows: slice, dtype) -> torch.Tensor:
        return self.codes[rows].to(dtype) * self.scales[rows, None].to(dtype)

    def grad_rows(self, g: torch.Tensor) -> torch.Tensor:
        out = g.new_zeros(g.shape[0], self.in_features)
        step = max(1, BACKWARD_CHUNK // self.in_features)
        for r in range(0, self.out_features, step):
            out.addmm_(g[:, r:r + step], self.dequantized(slice(r, r + step), g.dtype))
        return out


def int4_group(in_features: int) -> Optional[int]:
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


def int4_codes(weight: torch.Tensor, group: int):
    """Codes 0..15 (out, in) int32 and (in/group, out, 2) bf16 scales and offsets, asymmetric per
    group of `group` inputs, in the fused kernels' convention w ~ (code - 8) * scale + offset."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(KERNEL_DTYPE).tiny).to(KERNEL_DTYPE).float()
    offset = (lo + 8 * scale).to(KERNEL_DTYPE).float()
    codes = torch.round((w - offset[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.int32).view(n, k)
    return codes, torch.stack([scale, offset], -1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)


class Int4Weight(FusedWeight):
    """4-bit codes packed two per byte in the fused kernel's layout (the CPU's or tinygemm's on
    CUDA), with a scale and an offset per group of inputs."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = n, k = weight.shape
        self.group = int4_group(k)
        cuda = weight.device.type == "cuda"
        if self.group is None or n % (8 if cuda else 16):
            raise UserError(f"--quantize int4: a {n}x{k} weight slice does not fit the int4 kernels (inputs a multiple "
                            f"of 32, outputs of {8 if cuda else 16}): use --quantize int8 or nf4")
        codes, scale_offsets = int4_codes(weight, self.group)
        if cuda:  # tinygemm takes the codes two per byte, the first in the high half
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.cuda_kernel = cuda
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_offsets", scale_offsets, persistent=False)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm if self.cuda_kernel else torch.ops.aten._weight_int4pack_mm_for_cpu
        return mm(x, self.packed, self.group, self.scale_offsets.to(KERNEL_DTYPE))

    def grad_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The packed layout is the kernel's own, so W's columns come out of the kernel itself:
        rows of the identity times W.T (a slice of the input width at a time)."""
        k = self.in_features
        out = g.new_empty(g.shape[0], k)
        step = max(1, BACKWARD_CHUNK // self.out_features)
        for c in range(0, k, step):
            width = min(step, k - c)
            eye = torch.zeros(width, k, dtype=KERNEL_DTYPE, device=g.device)
            eye[torch.arange(width), torch.arange(c, c + width)] = 1
            out[:, c:c + width] = g @ self.product(eye).to(g.dtype).T  # product: W[:, c:c+width].T
        return out


def quantize_weight(weight: torch.Tensor, mode: str, device, dtype: torch.dtype, kernel: str = "fused") -> nn.Module:
    """A module computing `x @ weight.T` from `weight` (out, in) quantized by `mode`, on `device`,
    taking and giving `dtype`; `kernel` (check_kernels): "fused", or int8's fallback library.
    The full-precision `weight` is not kept."""
    out_features, in_features = weight.shape
    weight = weight.to(device=device, dtype=dtype)
    if mode == "int8" and kernel == "fused":
        return Int8Weight(weight)
    if mode == "int4":
        return Int4Weight(weight)
    if mode == "int8":
        tq = _torchao()
        with torch.device("meta"):
            layer = nn.Linear(in_features, out_features, bias=False)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        tq.quantize_(layer, tq.Int8WeightOnlyConfig(), device=device)
        return layer.requires_grad_(False)
    if mode == "nf4":
        bnb = _bitsandbytes()
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                                  compress_statistics=True, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK,
                                         compress_statistics=True)
        layer = layer.to(device)  # bitsandbytes quantizes as the weight moves to its device
        if layer.weight.dtype != torch.uint8:
            raise RuntimeError(f"bitsandbytes left the weight as {layer.weight.dtype}, not packed 4-bit codes")
        return layer.requires_grad_(False)
    raise ValueError(f"not a quantized mode: {mode}")


class QuantizedLinear(nn.Module):
    """A frozen linear layer (plain, or one of fairscale's parallel ones, whose communication it
    keeps) whose weight is this rank's slice quantized by `mode` (`quantize_weight`)."""

    def __init__(self, layer: nn.Module, weight: torch.Tensor, mode: str, device, dtype: torch.dtype,
                 kernel: str = "fused"):
        super().__init__()
        self.mode = mode
        self.library = library(mode, kernel)
        self.inner = quantize_weight(weight, mode, device, dtype, kernel)
        self.copy_in = isinstance(layer, ColumnParallelLinear)
        self.gather = self.copy_in and layer.gather_output
        self.reduce = isinstance(layer, RowParallelLinear)

    def forward(self, x):
        if self.copy_in:
            x = fs_mappings.copy_to_model_parallel_region(x)
        y = self.inner(x)
        if self.reduce:
            return fs_mappings.reduce_from_model_parallel_region(y)
        if self.gather:
            return fs_mappings.gather_from_model_parallel_region(y)
        return y

    def extra_repr(self) -> str:
        return f"mode={self.mode}, library={self.library}"


def library(mode: str, kernel: str = "fused") -> str:
    return LIBRARY[mode] if kernel == "fused" else kernel


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, quantized codes and their scales
    included (each tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        for part in _storage_parts(t):
            key = (part.untyped_storage().data_ptr(), part.dtype, part.shape)
            if key not in seen:
                seen.add(key)
                total += part.numel() * part.element_size()
    return total


def _storage_parts(t: torch.Tensor):
    """The plain tensors behind `t`: itself, a torchao subclass' inner tensors, or a
    bitsandbytes 4-bit weight and its quantization state."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _storage_parts(getattr(t, n))
        return
    yield t
    state = getattr(t, "quant_state", None)
    if state is not None:
        for v in state.as_dict(packed=False).values():
            if isinstance(v, torch.Tensor):
                yield v


def check_kernels(mode: str, device, dtype: torch.dtype, flag: str = "--quantize") -> str:
    """The kernel `mode` multiplies with on `device` ("fused", or int8's fallback library, said in
    one line on stderr), found by running one small quantized layer forwards and backwards there
    against full precision; a mode with none is refused in one line. Checked once per process."""
    if mode == "none":
        return "fused"
    return _kernel(mode, torch.device(device), dtype, flag)


@functools.lru_cache(maxsize=None)
def _kernel(mode: str, device: torch.device, dtype: torch.dtype, flag: str) -> str:
    where = f"on {device.type} in {str(dtype).replace('torch.', '')}"
    kernel = "fused" if mode in ("int8", "int4") else LIBRARY[mode]
    why = probe(mode, device, dtype, kernel)
    if why is None:
        return kernel
    fallback = FALLBACK_LIBRARY.get(mode) if kernel == "fused" else None
    if fallback and probe(mode, device, dtype, fallback) is None:
        print(f"{flag} {mode}: no fused kernel {where} ({why}): falling back to {fallback}'s eager int8 layer "
              f"(the same memory, slower decoding)", file=sys.stderr)
        return fallback
    hint = "use --quantize nf4, int8 or another device" if mode == "int4" else "use another --quantize mode or device"
    raise UserError(f"{flag} {mode} has no working kernel {where} ({LIBRARY[mode]}: {why}): {hint}")


def probe(mode: str, device: torch.device, dtype: torch.dtype, kernel: str) -> Optional[str]:
    """None when a 128x128 layer of `mode` through `kernel` runs on `device` and its output and
    input gradient stay near full precision's; else the first line of what went wrong."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(128, 128, generator=g), torch.randn(2, 128, generator=g)
    try:
        layer = quantize_weight(w, mode, device, dtype, kernel)
        x = x.to(device=device, dtype=dtype).requires_grad_()
        y = layer(x)
        y.float().square().sum().backward()
        ref_x = x.detach().float().cpu()
        ref = ref_x @ w.T
        errors = [relative_error(y.detach().float().cpu(), ref),
                  relative_error(x.grad.float().cpu(), 2 * ref @ w)]
        if not all(e < 0.25 for e in errors):  # NF4 and int4 are near 0.1 here; a wrong layout near 1.4
            return f"results off by {max(errors):.0%} of full precision's"
        return None
    except Exception as e:  # an import error, a missing kernel, a device the library does not know
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_modes(modes, flag: str = "--quantize") -> list:
    """A benchmark's list of modes: each known, none twice, at least one."""
    modes = [modes] if isinstance(modes, str) else list(modes or [])
    for mode in modes:
        if mode not in MODES:
            raise UserError(f"{flag}: {mode!r} is not one of {', '.join(MODES)}")
    if not modes:
        raise UserError(f"{flag} is empty: give at least one of {', '.join(MODES)}")
    if len(set(modes)) < len(modes):
        raise UserError(f"{flag} {modes} names a mode twice: give each once")
    return modes


def describe(mode: Optional[str]) -> str:
    if not mode or mode == "none":
        return "full precision"
    return f"{mode} weight-only ({LIBRARY[mode]})"


def quantize_model(model: nn.Module, mode: str) -> int:
    """Quantize an already-built model's layers in place as `plan` says (the benchmark's random
    models; checkpoints are quantized as they load instead). Returns how many layers changed."""
    if mode == "none":
        return 0
    how = plan(mode, model.norm.weight.device, model.norm.weight.dtype)
    tied = getattr(model.output, "weight", None) is model.tok_embeddings.weight
    names = {m: n + ".weight" for n, m in model.named_modules()
             if how.layer_mode(n + ".weight") and not (tied and n == "output")}
    return model.swap_linears(lambda m: how.layer(m, names[m], m.weight.detach()) if m in names else None)
