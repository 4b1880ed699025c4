"""Cross-entropy on the reference captions (ClipCap): the loss of a step is the summed token loss
of all its micro-batches on all data-parallel ranks, divided by their target tokens, so any
(DP, accumulation) split of a global batch computes the same update."""

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import distributed
from ..data import collate
from . import StepResult, register

if TYPE_CHECKING:
    from ..training import TrainConfig, Trainer


@register("xe")
@dataclass
class CrossEntropy:
    captions: str  # --captions: every caption each epoch, or one drawn per image
    num_workers: int  # validation's image-loading processes

    @staticmethod
    def check(cfg: "TrainConfig") -> None:
        pass

    @classmethod
    def from_config(cls, cfg: "TrainConfig") -> "CrossEntropy":
        return cls(cfg.captions, cfg.num_workers)

    def prepare(self, trainer: "Trainer", env) -> None:
        pass

    def step(self, trainer: "Trainer", micro_batches: List[dict], env, step: int) -> StepResult:
        return StepResult(*optimizer_step(trainer, micro_batches, env))

    def validate(self, trainer: "Trainer", env) -> Dict[str, float]:
        return {"val_loss": validation_loss(trainer, env, self.num_workers)}


def optimizer_step(trainer: "Trainer", micro_batches: List[dict], env):
    """One optimizer step over this rank's micro-batches. Returns (loss per target token, samples
    in the global step); the loss is None when it was NaN/inf and the step was skipped, or when no
    rank had a sample (samples 0)."""
    captioner = trainer.captioner
    # Tokenize once: the step's target count is needed before any loss is computed.
    ids = [captioner.caption_ids(b["caption"]) if b["image_id"] else [] for b in micro_batches]
    counts = torch.tensor([sum(len(x) + 1 for batch_ids in ids for x in batch_ids),
                           sum(len(b["image_id"]) for b in micro_batches)], dtype=torch.float64,
                          device=env.device)  # NCCL reduces device tensors only
    dist.all_reduce(counts, group=env.dp_group)
    n_targets, n_samples = float(counts[0]), int(counts[1])
    if n_samples == 0:  # every rank's shards ran out before their counted end (a shard cut short): no update
        return None, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    for b, batch_ids in zip(micro_batches, ids):
        if not b["image_id"]:
            continue
        with trainer.autocast():
            part, _ = captioner.loss(trainer.features_of(b), batch_ids)
        trainer.scaler.scale(part / n_targets).backward()
        loss_sum += part.detach().double()
    totals = distributed.all_reduce_gradients(list(captioner.projection.parameters()), loss_sum, env.dp_group)
    return trainer.update(float(totals[0]) / max(n_targets, 1.0)), n_samples


@torch.no_grad()
def validation_loss(trainer: "Trainer", env, num_workers: int) -> float:
    """Mean per-token validation loss over the whole split, shared out over data-parallel ranks."""
    projection = trainer.captioner.projection
    projection.eval()
    idx = list(range(env.dp_rank, len(trainer.val_set), env.dp_size))
    batches = [idx[i:i + trainer.micro_batch] for i in range(0, len(idx), trainer.micro_batch)]
    loader = torch.utils.data.DataLoader(trainer.val_set, batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=collate)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for b in tqdm(loader, desc="validation", disable=not env.is_main, leave=False, file=sys.stderr):
        if not b["image_id"]:
            continue
        with trainer.autocast():
            loss, n = trainer.captioner.caption_loss(trainer.features_of(b), b["caption"])
        total += torch.tensor([float(loss), n], dtype=torch.float64, device=env.device)
    dist.all_reduce(total, group=env.dp_group)
    projection.train()
    return float(total[0] / max(total[1], 1))
