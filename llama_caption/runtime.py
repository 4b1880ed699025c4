"""Choices every entry point makes the same way: dtype names, device defaults."""

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA (LLaMA's released precision) and fp32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of auto, fp32, fp16, bf16")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--dtype fp16 is slow or unsupported on the CPU: use fp32 or bf16 there")
    return dtype
