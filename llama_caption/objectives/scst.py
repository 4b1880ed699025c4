"""Self-critical sequence training, from a projection trained with cross-entropy (the reward,
keyed sampling, log-probabilities and advantages: llama_caption/scst.py).

A step samples `--scst_samples` captions per image (each image once an epoch: its samples stand
for its captions), scores them (`--scst_reward`: CIDEr-D against the image's references, CLIP-S
against the image, or a weighted sum), and backpropagates the advantage times each sample's
log-probability; validation adds the CIDEr-D of greedy captions.

CLIP-S comes from the run's own CLIP: the image side is the pooled feature the step already
holds (the CLIP's image embedding, from the cache or the encoder), so no image is encoded twice;
the text side is that CLIP's text tower, loaded once in `prepare`."""

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
from ..scst import REWARDS, CiderD, advantages, sample_captions, sample_keys, sequence_logprobs
from . import StepResult, register
from .xe import validation_loss

if TYPE_CHECKING:
    from ..training import TrainConfig, Trainer

FLAGS = {"max_gen_len": "--max_caption_len", "temperature": "--scst_temperature"}  # Decoding's names as train's flags
MAX_WEIGHT = 100.0  # a reward weight's upper bound (CIDEr-D is about 0-10 here, CLIP-S 0-2.5)


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
    reward: str = "cider"  # --scst_reward
    weights: tuple = (1.0, 0.0)  # CIDEr-D's and CLIP-S's weights in the reward
    captions: str = "one"
    cider: Optional[CiderD] = None  # the reward: document frequencies from the training references
    clip: object = None  # rerank.ClipRanker: the run's CLIP with its text tower, for CLIP-S

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
        if cfg.scst_reward not in REWARDS:
            raise UserError(f"--scst_reward {cfg.scst_reward!r} must be one of {', '.join(REWARDS)}")
        for flag in ("scst_cider_weight", "scst_clip_weight"):
            if not 0 <= getattr(cfg, flag) <= MAX_WEIGHT:
                raise UserError(f"--{flag} must be from 0 to {MAX_WEIGHT:g}, got {getattr(cfg, flag)}")
            if cfg.scst_reward != "cider+clip" and getattr(cfg, flag) != 1.0:
                raise UserError(f"--{flag} weighs a term of --scst_reward cider+clip; with --scst_reward "
                                f"{cfg.scst_reward} the reward is that score alone: leave it out")
        if cfg.scst_reward == "cider+clip" and cfg.scst_cider_weight == 0 and cfg.scst_clip_weight == 0:
            raise UserError("--scst_cider_weight and --scst_clip_weight are both 0: the reward would be 0 for every caption")
        if cfg.scst_reward != "cider" and cfg.feature_kind != "pooled":
            raise UserError(f"--scst_reward {cfg.scst_reward} takes the image's CLIP embedding from pooled features: "
                            f"use --feature_kind pooled, or --scst_reward cider")

    @classmethod
    def from_config(cls, cfg: "TrainConfig") -> "Scst":
        weights = {"cider": (1.0, 0.0), "clip": (0.0, 1.0)}.get(cfg.scst_reward, (cfg.scst_cider_weight,
                                                                                 cfg.scst_clip_weight))
        return cls(cfg.scst_samples, cfg.scst_baseline, sampling(cfg), cfg.num_workers, cfg.scst_reward, weights)

    @property
    def greedy(self) -> Decoding:
        return replace(self.decoding, temperature=0.0)

    def prepare(self, trainer: "Trainer", env) -> None:
        records = trainer.data.dataset.records
        self.cider = CiderD({r.image_id: r.captions for r in records})
        if self.weights[1] > 0:
            from ..rerank import clip_ranker

            self.clip = clip_ranker(trainer.spec.encoder, env.device, f"--scst_reward {self.reward}")
        env.log(f"SCST: reward {self.weights[0]:g} x CIDEr-D (document frequencies from the {len(records)} training "
                f"images' references) + {self.weights[1]:g} x CLIP-S" if self.reward != "cider" else
                f"SCST: CIDEr-D reward, document frequencies from the {len(records)} training images' references")

    def rewards(self, image_ids: List[int], captions: List[str], features: torch.Tensor) -> torch.Tensor:
        """Each caption's reward (float64): weights[0] x CIDEr-D + weights[1] x CLIP-S, where CLIP-S
        is against its image's embedding (`features`: the pooled CLIP features, one row per caption)."""
        total = torch.zeros(len(captions), dtype=torch.float64)
        if self.weights[0] > 0:
            total += self.weights[0] * torch.tensor(self.cider.scores(image_ids, captions), dtype=torch.float64)
        if self.weights[1] > 0:
            images = torch.nn.functional.normalize(features.float(), dim=-1).cpu()
            total += self.weights[1] * torch.tensor(self.clip.scores(images, captions), dtype=torch.float64)
        return total

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
        features = trainer.features_of(b)
        rewards = self.rewards(ids, [tok.decode(t) for t in tokens], features.repeat_interleave(k, 0))
        rewards = rewards.view(len(b["image_id"]), k)
        adv = advantages(rewards, self.baseline, self.greedy_rewards(cap, prefix, b["image_id"], features))
        adv = adv.flatten().to(dev)
        with trainer.autocast():
            logp = sequence_logprobs(llama, rows, tokens, ended, tok.bos_id, tok.eos_id)
        part = -(adv * logp.double()).sum()
        trainer.scaler.scale((part / n_global).float()).backward()
        return torch.tensor([float(part.detach()), float(rewards.sum()), sum(len(t) for t in tokens)],
                            dtype=torch.float64, device=dev)

    def greedy_rewards(self, cap, prefix: torch.Tensor, image_ids: List[int],
                       features: torch.Tensor) -> Optional[torch.Tensor]:
        """The greedy baseline: the reward of each image's greedy caption (None: the mean baseline)."""
        if self.baseline != "greedy":
            return None
        tok = cap.tokenizer
        best = decode(cap.llama, [[tok.bos_id]] * len(image_ids), self.greedy, eos_id=tok.eos_id,
                      prefix=prefix.detach())
        return self.rewards(image_ids, [tok.decode(t) for t in best], features)

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
