"""Process groups from torchrun's environment (or a plain single process), and the collectives
the training loop needs.

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
from typing import Iterator, List, Optional

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

    def log(self, message: str) -> None:
        """A progress or warning line on stderr, from rank 0 only."""
        if self.is_main:
            print(message, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(device: Optional[str], local_rank: int) -> torch.device:
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} must be auto, cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def check_model_parallel(mp: int, n_heads: int, n_kv_heads: int, how: str) -> None:
    """Model parallelism splits attention heads: `mp` must divide both head counts."""
    if mp < 1 or n_heads % mp or n_kv_heads % mp:
        raise UserError(f"{how} {mp} must divide n_heads {n_heads} and n_kv_heads {n_kv_heads}")


def setup(mp_size: Optional[int] = None, device: Optional[str] = None, seed: int = 1,
          quiet: bool = True) -> DistEnv:
    """Initialise torch.distributed and fairscale's model parallelism (unless already done).

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
            f"model-parallel size {mp} does not divide the {world} process(es): launch with torchrun "
            f"--nproc_per_node {mp} (or a multiple, for data parallelism), or pass --model_parallel with a divisor of "
            f"{world}"
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
    elif fs_init.get_model_parallel_world_size() != mp:
        raise ValueError(f"model parallelism is already set up with size {fs_init.get_model_parallel_world_size()}, not {mp}")
    torch.manual_seed(seed)
    if quiet and rank != 0:
        sys.stdout = open(os.devnull, "w")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, mp_size=mp,
                   mp_rank=fs_init.get_model_parallel_rank(), dp_size=world // mp,
                   dp_rank=fs_init.get_data_parallel_rank(), device=dev)


def teardown() -> None:
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(mp_size: Optional[int] = None, device: Optional[str] = None, seed: int = 1,
            quiet: bool = True) -> Iterator[DistEnv]:
    """`with session(...) as env:` sets the process groups up and tears down what it set up.

    A caller that already holds process groups (a test, the demo) keeps them afterwards.
    """
    owned = not dist.is_initialized()
    env = setup(mp_size, device, seed, quiet)
    try:
        yield env
    finally:
        if owned:
            teardown()


def all_reduce_gradients(params: List[torch.nn.Parameter], extra: torch.Tensor, group) -> torch.Tensor:
    """Sum the gradients of `params` and the values `extra` over the data-parallel group in one
    flat buffer (one all-reduce); returns the summed `extra`. Missing gradients count as zero."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params] + [extra.to(params[0].grad.dtype).flatten()])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat[offset:]


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
