"""Weight-only quantized frozen LLaMAs: `--quantize none|int8|int4`.

The LLaMA is frozen, so its weights only carry activations forward and the activations'
gradients back to the prefix. The linear layers of the transformer blocks (attention's
wq/wk/wv/wo and the feed-forward's w1/w2/w3: all but a few percent of the weights) are
quantized one at a time as this rank's slice arrives from the checkpoint (`load_llama`), so a
full-precision copy of the whole model never exists; the embedding, the norms and the output
layer stay in the run's precision.

- int8: torchao's `Int8WeightOnlyConfig` (int8 per output row, one scale each; the product is
  computed in the activations' precision). PyTorch's own, on the CPU and CUDA.
- int4: bitsandbytes' NF4 (`Linear4bit`: 4-bit normal-float codes, two per byte, one scale per
  64 weights, the scales themselves quantized: QLoRA's and LLaVA's `--load-4bit`). torchao 0.18's
  int4 weight-only needs CUDA (tinygemm) or the `mslk` package (not on PyPI), and its CPU int4
  stores one code per byte, so bitsandbytes is the one that halves int8's memory on both devices.

Both let gradients flow to a layer's input (checked by tests/test_quantize.py). Each layer keeps
fairscale's model-parallel communication: a column-parallel layer copies its input into the
region (its gradient is all-reduced backwards), a row-parallel one all-reduces its output.
"""

import contextlib
import logging
from typing import Optional

import torch
from fairscale.nn.model_parallel import mappings as fs_mappings
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from ..errors import UserError

MODES = ("none", "int8", "int4")
LIBRARY = {"int8": "torchao", "int4": "bitsandbytes"}
# The block linears of model.py's TransformerBlock, by parameter name ending.
QUANTIZED_SUFFIXES = tuple(f"{part}.weight" for part in
                           ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
NF4_BLOCK = 64


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
    """Whether the weight called `name` (model.py's names) is quantized when a mode is on."""
    return name.startswith("layers.") and name.endswith(QUANTIZED_SUFFIXES)


def quantize_weight(weight: torch.Tensor, mode: str, device, dtype: torch.dtype) -> nn.Module:
    """A module computing `x @ weight.T` from `weight` (out, in) quantized by `mode`, on `device`,
    taking and giving `dtype`. The full-precision `weight` is not kept."""
    out_features, in_features = weight.shape
    weight = weight.to(device=device, dtype=dtype)
    if mode == "int8":
        tq = _torchao()
        with torch.device("meta"):
            layer = nn.Linear(in_features, out_features, bias=False)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        tq.quantize_(layer, tq.Int8WeightOnlyConfig(), device=device)
        return layer.requires_grad_(False)
    if mode == "int4":
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

    def __init__(self, layer: nn.Module, weight: torch.Tensor, mode: str, device, dtype: torch.dtype):
        super().__init__()
        self.mode = mode
        self.inner = quantize_weight(weight, mode, device, dtype)
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
        return f"mode={self.mode}, library={LIBRARY[self.mode]}"


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


def check_kernels(mode: str, device, dtype: torch.dtype, flag: str = "--quantize") -> None:
    """Refuse, in one line, a mode whose library has no kernel on `device` (or is not installed),
    by running one small quantized layer forwards and backwards there."""
    if mode == "none":
        return
    device = torch.device(device)
    try:
        layer = quantize_weight(torch.randn(128, 128, generator=torch.Generator().manual_seed(0)), mode, device, dtype)
        x = torch.randn(2, 128, device=device, dtype=dtype, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite gradient reached the input")
    except Exception as e:  # an import error, a missing kernel, a device the library does not know
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{flag} {mode} has no working kernel on {device.type} in {str(dtype).replace('torch.', '')} "
                        f"({LIBRARY[mode]}: {first}): use another --quantize mode or device") from None


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
    """Quantize an already-built model's block linears in place (the benchmark's random models;
    checkpoints are quantized as they load instead). Returns how many layers changed."""
    if mode == "none":
        return 0
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    check_kernels(mode, device, dtype)
    targets = {m for n, m in model.named_modules() if is_quantized(n + ".weight")}
    return model.swap_linears(lambda m: QuantizedLinear(m, m.weight.detach(), mode, device, dtype)
                               if m in targets else None)
