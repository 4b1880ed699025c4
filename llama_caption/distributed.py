"""Process-group set-up from torchrun's environment (or a plain single process).

World = model-parallel (MP) x data-parallel (DP). fairscale puts consecutive ranks in one
model-parallel group, so on one node an MP group never crosses a node boundary when MP divides
the GPUs per node. Ranks with the same MP rank form a data-parallel group.
"""

import contextlib
import io
import os
import socket
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from .errors import UserError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    mp_size: int
    mp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self):
        return fs_init.get_data_parallel_group()

    @property
    def mp_group(self):
        return fs_init.get_model_parallel_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(device: Optional[str], local_rank: int) -> torch.device:
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(mp_size: Optional[int] = None, device: Optional[str] = None, seed: int = 1,
          quiet: bool = True) -> DistEnv:
    """Initialise torch.distributed and fairscale's model parallelism.

    mp_size None means every rank is one model-parallel group (world_size). The same seed is
    set on every rank. With `quiet`, ranks other than 0 print nothing to stdout.
    """
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0)) if torchrun else 0
    world = int(os.environ.get("WORLD_SIZE", 1)) if torchrun else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if torchrun else 0
    mp = world if mp_size is None else mp_size
    if mp < 1 or world % mp:
        raise UserError(
            f"the checkpoint needs model-parallel size {mp}, which does not divide the {world} "
            f"processes: launch with torchrun --nproc_per_node a multiple of {mp}, or reshard with "
            f"python -m llama_caption.reshard"
        )
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if torchrun:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints three lines per rank
            fs_init.initialize_model_parallel(mp)
    torch.manual_seed(seed)
    if quiet and rank != 0:
        sys.stdout = open(os.devnull, "w")
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        mp_size=mp,
        mp_rank=fs_init.get_model_parallel_rank(),
        dp_size=world // mp,
        dp_rank=fs_init.get_data_parallel_rank(),
        device=dev,
    )


def teardown() -> None:
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
