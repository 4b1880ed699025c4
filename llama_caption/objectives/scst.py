"""Self-critical sequence training on CIDEr-D, from a projection trained with cross-entropy (the
reward, keyed sampling, log-probabilities and advantages: llama_caption/scst.py).

A step samples `--scst_samples` captions per image (each image once an epoch: its samples stand
for its captions), scores them against the image's references, and backpropagates the
advantage times each sample's log-probability; validation adds the CIDEr-D of greedy captions."""

import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import distributed
from ..data import collate
from ..errors import UserError
from ..llama.decoding import MAX_TEMPERATURE, MIN_TEMPERATURE, Decoding, decode
from ..scst import CiderD, advantages, sample_captions, sample_keys, sequence_logprobs
from . import StepResult, register
from .xe import validation_loss

if TYPE_CHECKING:
    from ..training import TrainConfig, Trainer

FLAGS = {"max_gen_len": "--max_caption_len", "temperature": "--scst_temperature"}  # Decoding's names as train's flags


def sampling(cfg: "TrainConfig") -> Decoding:
    """--max_caption_len, --scst_temperature and --seed as the Decoding the samples are drawn with,
    within its limits (its messages, naming train's flags)."""
    return Decoding(max_gen_len=cfg.max_caption_len, temperature=cfg.scst_temperature, seed=cfg.seed).check(
        lambda name: FLAGS.get(name, "--" + name))


@register("scst")
@dataclass
class Scst:
    samples: int  # --scst_samples per image per step
    baseline: str  # --scst_baseline: mean or greedy
    decoding: Decoding  # how samples are drawn (length, temperature, seed)
    num_workers: int  # validation's image-loading processes
    captions: str = "one"
    cider: Optional[CiderD] = None  # the reward: document frequencies from the training references

    @staticmethod
    def check(cfg: "TrainConfig") -> None:
        if not cfg.init_from:
            raise UserError("--objective scst needs --init_from RUN_DIR: a projection trained with cross-entropy first")
        if cfg.scst_baseline == "mean" and cfg.scst_samples < 2:
            raise UserError(f"--scst_samples {cfg.scst_samples}: the mean baseline needs at least 2 samples per image")
        if not MIN_TEMPERATURE <= cfg.scst_temperature <= MAX_TEMPERATURE:  # Decoding's 0 is greedy: no sample would differ
            raise UserError(f"--scst_temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (SCST samples: 0, "
                            f"greedy, draws nothing to compare), got {cfg.scst_temperature}")
        sampling(cfg)
        if cfg.train_shards:
            raise UserError("--objective scst needs each image's reference captions: train it on COCO (--train_images), "
                            "not --train_shards")

    @classmethod
    def from_config(cls, cfg: "TrainConfig") -> "Scst":
        return cls(cfg.scst_samples, cfg.scst_baseline, sampling(cfg), cfg.num_workers)

    @property
    def greedy(self) -> Decoding:
        return replace(self.decoding, temperature=0.0)

    def prepare(self, trainer: "Trainer", env) -> None:
        records = trainer.data.dataset.records
        self.cider = CiderD({r.image_id: r.captions for r in records})
        env.log(f"SCST: CIDEr-D reward, document frequencies from the {len(records)} training images' references")

    def step(self, trainer: "Trainer", micro_batches: List[dict], env, step: int) -> StepResult:
        """Loss per sample, samples in the global step, and the mean reward and sample length."""
        k = self.samples
        count = torch.tensor([float(sum(len(b["image_id"]) for b in micro_batches) * k)], dtype=torch.float64,
                             device=env.device)
        dist.all_reduce(count, group=env.dp_group)
        n_global = float(count[0])
        stats = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, reward, sampled tokens
        for b in micro_batches:
            if b["image_id"]:
                stats += self.backward(trainer, b, env, step, n_global)
        totals = distributed.all_reduce_gradients(list(trainer.captioner.projection.parameters()), stats, env.dp_group)
        loss = trainer.update(float(totals[0]) / n_global)
        return StepResult(loss, int(n_global) // k,
                          {"reward": float(totals[1]) / n_global, "sample_len": float(totals[2]) / n_global})

    def backward(self, trainer: "Trainer", b: dict, env, step: int, n_global: float) -> torch.Tensor:
        """Samples of one micro-batch, their rewards and the policy gradient (its share of the
        step's loss); returns (loss, reward, sampled tokens), summed over the samples."""
        cap, k, dev = trainer.captioner, self.samples, env.device
        tok, llama = cap.tokenizer, cap.llama
        with trainer.autocast():
            prefix = cap.projection(trainer.features_of(b).to(dev))
        rows = prefix.repeat_interleave(k, 0)
        keys = sample_keys(self.decoding.seed, step, b["image_id"], k, dev)
        tokens, ended = sample_captions(llama, rows.detach(), tok.bos_id, tok.eos_id, self.decoding, keys)
        ids = [i for i in b["image_id"] for _ in range(k)]
        rewards = torch.tensor(self.cider.scores(ids, [tok.decode(t) for t in tokens]), dtype=torch.float64)
        rewards = rewards.view(len(b["image_id"]), k)
        adv = advantages(rewards, self.baseline, self.greedy_rewards(cap, prefix, b["image_id"])).flatten().to(dev)
        with trainer.autocast():
            logp = sequence_logprobs(llama, rows, tokens, ended, tok.bos_id, tok.eos_id)
        part = -(adv * logp.double()).sum()
        trainer.scaler.scale((part / n_global).float()).backward()
        return torch.tensor([float(part.detach()), float(rewards.sum()), sum(len(t) for t in tokens)],
                            dtype=torch.float64, device=dev)

    def greedy_rewards(self, cap, prefix: torch.Tensor, image_ids: List[int]) -> Optional[torch.Tensor]:
        """The greedy baseline: the reward of each image's greedy caption (None: the mean baseline)."""
        if self.baseline != "greedy":
            return None
        tok = cap.tokenizer
        best = decode(cap.llama, [[tok.bos_id]] * len(image_ids), self.greedy, eos_id=tok.eos_id,
                      prefix=prefix.detach())
        return torch.tensor(self.cider.scores(image_ids, [tok.decode(t) for t in best]), dtype=torch.float64)

    def validate(self, trainer: "Trainer", env) -> Dict[str, float]:
        return {"val_loss": validation_loss(trainer, env, self.num_workers),
                "val_cider": self.validation_cider(trainer, env)}

    @torch.no_grad()
    def validation_cider(self, trainer: "Trainer", env) -> float:
        """Mean CIDEr-D (the reward's scorer; document frequencies from the validation references) of
        greedy captions of the validation images, shared out over data-parallel ranks."""
        data = trainer.val_set
        scorer = CiderD({r.image_id: r.captions for r in data.records})
        mine = data.first_samples()[env.dp_rank::env.dp_size]
        batches = [mine[i:i + trainer.micro_batch] for i in range(0, len(mine), trainer.micro_batch)]
        loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=self.num_workers,
                                             collate_fn=collate)
        total = torch.zeros(2, dtype=torch.float64, device=env.device)
        trainer.captioner.projection.eval()
        for b in tqdm(loader, desc="validation CIDEr-D", disable=not env.is_main, leave=False, file=sys.stderr):
            if not b["image_id"]:
                continue
            with trainer.autocast():
                captions = trainer.captioner.caption(trainer.features_of(b), self.greedy)
            total += torch.tensor([sum(scorer.scores(b["image_id"], captions)), len(captions)], dtype=torch.float64,
                                  device=env.device)
        dist.all_reduce(total, group=env.dp_group)
        trainer.captioner.projection.train()
        return float(total[0] / max(total[1], 1))
