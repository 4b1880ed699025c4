"""Choices every entry point makes the same way: dtype names, device defaults."""

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = ("auto",) + tuple(DTYPES)


def resolve_dtype(name: str, device: torch.device, training: bool = False) -> torch.dtype:
    """The frozen LLaMA's dtype. `auto`: fp32 on the CPU; on CUDA fp16 (LLaMA's released
    precision) for inference, bf16 for training where the GPU has it (no loss scaling needed)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if training and torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of auto, fp32, fp16, bf16")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--dtype fp16 is slow or unsupported on the CPU: use fp32 or bf16 there")
    return dtype
