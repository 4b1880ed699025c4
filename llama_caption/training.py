"""The training loop behind captioning_training.py: only the projection learns.

World = MP x DP. Every rank of a model-parallel group sees the same micro-batch; data-parallel
groups see different ones. The loss of an optimizer step is divided by the number of target
tokens of the whole step (all micro-batches, all data-parallel ranks), and projection gradients
are summed over the data-parallel group, so any (DP, accumulation) split of one global batch
computes the same update.
"""

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import distributed
from .captioner import Captioner, CaptionStyle
from .checkpoint import (find_checkpoint, list_shards, load_llama, load_projection_checkpoint,
                         load_trainer_state, optimizer_state_from, save_training_checkpoint)
from .data import CaptionDataset, StepBatches, collate, drop_missing, load_split
from .errors import UserError
from .features import FeatureCache
from .fileio import write_text
from .projection import Projection
from .runtime import resolve_dtype
from .vision import ClipEncoder, clip_identity, features_meta


@dataclass
class TrainConfig:
    ckpt_dir: str
    tokenizer_path: str
    clip_model: str
    train_images: str
    out_dir: str
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    karpathy_split: Optional[str] = None
    features: Optional[str] = None
    val_features: Optional[str] = None
    feature: str = "pooled"
    clip_layer: int = -2
    projection: str = "mlp"
    prefix_len: int = 10
    proj_hidden: Optional[int] = None
    captions: str = "all"
    lowercase: bool = True
    drop_period: bool = True
    max_caption_len: int = 48
    epochs: int = 5
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "auto"
    device: str = "auto"
    num_workers: int = 2
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    max_bad_steps: int = 10
    seed: int = 0
    resume: bool = False
    stop_after_steps: Optional[int] = None

    # Settings that may change between an interrupted run and its resumption.
    RESUMABLE_CHANGES = ("resume", "stop_after_steps", "num_workers", "save_every", "keep_last",
                         "log_every", "device", "out_dir", "max_bad_steps")

    def recorded(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def validate(cfg: TrainConfig, dp_size: int) -> int:
    """Check flags; return the micro-batch size per rank."""
    for name in ("epochs", "batch_size", "grad_accum", "max_caption_len", "log_every", "save_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.batch_size % (dp_size * cfg.grad_accum):
        raise UserError(f"--batch_size {cfg.batch_size} must be divisible by data-parallel size {dp_size} x --grad_accum {cfg.grad_accum}")
    if cfg.val_images and not (cfg.val_annotations or cfg.karpathy_split):
        raise UserError("--val_images needs --val_annotations (or --karpathy_split)")
    return cfg.batch_size // (dp_size * cfg.grad_accum)


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and the loss-curve PNG, written by rank 0."""

    def __init__(self, out_dir: str, enabled: bool, resume_step: Optional[int]):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.png = os.path.join(out_dir, "loss_curve.png")
        self.enabled = enabled
        if enabled and resume_step is not None and os.path.isfile(self.path):
            # Lines the interrupted run wrote after its checkpoint are about to be redone.
            kept = [l for l in open(self.path) if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            write_text(self.path, "".join(kept))
        elif enabled and resume_step is None and os.path.isfile(self.path):
            os.remove(self.path)

    def write(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self):
        if not self.enabled or not os.path.isfile(self.path):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(l) for l in open(self.path) if l.strip()]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train), label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy per caption token")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        from .fileio import atomic_path

        with atomic_path(self.png) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


def encoder_meta(cfg: TrainConfig, encoder: Optional[ClipEncoder]) -> dict:
    if encoder is not None:
        return features_meta(encoder)
    return {"clip_model": cfg.clip_model, "clip_identity": clip_identity(cfg.clip_model), "feature": cfg.feature,
            "clip_layer": str(cfg.clip_layer if cfg.feature == "patch" else None)}


def open_cache(path: Optional[str], meta: dict, flag: str) -> Optional[FeatureCache]:
    if not path:
        return None
    cache = FeatureCache(path)
    cache.check(meta, flag)
    return cache


def restrict_to_cache(records, cache, flag, log):
    if cache is None:
        return records
    kept = [r for r in records if r.image_id in cache]
    if len(kept) < len(records):
        log(f"warning: {len(records) - len(kept)} image(s) have no features in {flag} {cache.path} (unreadable at extraction, or another split); skipped")
    if not kept:
        raise UserError(f"{flag} {cache.path} has features for none of the images of this split")
    return kept


def train(cfg: TrainConfig) -> dict:
    shards = list_shards(cfg.ckpt_dir)
    env = distributed.setup(mp_size=len(shards), device=cfg.device, seed=cfg.seed)
    try:
        return _train(cfg, env)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, env) -> dict:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if env.is_main else (lambda msg: None)
    micro = validate(cfg, env.dp_size)
    resume_from, trainer_state, tensors = None, None, None
    if cfg.resume:
        resume_from = find_checkpoint(cfg.out_dir, "--resume: --out_dir")
        _, saved = load_projection_checkpoint(resume_from, "--resume")
        diff = sorted(k for k in cfg.recorded()
                      if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != cfg.recorded().get(k))
        if diff:
            raise UserError(
                f"--resume: {resume_from} was trained with another configuration "
                f"({', '.join(f'{k}: {saved.get(k)!r} -> {cfg.recorded().get(k)!r}' for k in diff[:4])}): "
                f"use the same flags, or a new --out_dir"
            )
        trainer_state, tensors = load_trainer_state(resume_from)

    need_encoder = cfg.features is None or (cfg.val_images is not None and cfg.val_features is None)
    dtype = resolve_dtype(cfg.dtype, env.device, training=True)
    encoder = ClipEncoder(cfg.clip_model, env.device, cfg.feature, cfg.clip_layer) if need_encoder else None
    meta = encoder_meta(cfg, encoder)
    cache = open_cache(cfg.features, meta, "--features")
    val_cache = open_cache(cfg.val_features, meta, "--val_features")
    feature_shape = tuple(encoder.feature_shape) if encoder else tuple(cache.meta["shape"])
    prefix_len = cfg.prefix_len if cfg.feature == "pooled" else feature_shape[0]
    max_seq_len = prefix_len + 1 + cfg.max_caption_len
    llama, tokenizer = load_llama(cfg.ckpt_dir, cfg.tokenizer_path, max_seq_len, micro,
                                  device=env.device, dtype=dtype)
    projection = Projection(cfg.projection, cfg.feature, feature_shape, llama.args.dim, cfg.prefix_len,
                            cfg.proj_hidden).to(env.device)
    captioner = Captioner(llama, tokenizer, projection, CaptionStyle(cfg.lowercase, cfg.drop_period))

    train_records = load_split(cfg.train_images, cfg.train_annotations, cfg.karpathy_split, "train",
                               "--train_images", "--train_annotations")
    train_records = restrict_to_cache(drop_missing(train_records, log), cache, "--features", log)
    transform = encoder.preprocess if encoder else None
    train_set = CaptionDataset(train_records, None if cache else transform, cache, cfg.captions, cfg.seed)
    val_set = None
    if cfg.val_images:
        val_records = load_split(cfg.val_images, cfg.val_annotations, cfg.karpathy_split, "val",
                                 "--val_images", "--val_annotations")
        val_records = restrict_to_cache(drop_missing(val_records, log), val_cache, "--val_features", log)
        val_set = CaptionDataset(val_records, None if val_cache else transform, val_cache, "all", cfg.seed)

    steps_per_epoch = StepBatches(len(train_set), micro, cfg.grad_accum, env.dp_size, env.dp_rank, cfg.seed).steps
    if steps_per_epoch == 0:
        raise UserError(f"the training split has {len(train_set)} samples, fewer than one --batch_size {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_steps, max(1, total_steps // 10)) if cfg.warmup_steps > 0 else 0
    optimizer = torch.optim.AdamW(projection.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, cfg.min_lr_ratio))
    step = 0
    if resume_from:
        weights, _ = load_projection_checkpoint(resume_from)
        projection.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(optimizer_state_from(trainer_state, tensors))
        scheduler.load_state_dict(trainer_state["scheduler"])
        torch.set_rng_state(tensors["rng_cpu"])
        if "rng_cuda" in tensors and env.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng_cuda"])
        step = trainer_state["step"]
        log(f"resumed from {resume_from} at step {step}")

    use_amp = env.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    metrics = MetricsLog(cfg.out_dir, env.is_main, step if resume_from else None)
    if env.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        from .fileio import write_json

        write_json(os.path.join(cfg.out_dir, "config.json"), cfg.recorded(), indent=1)
    n_train = sum(p.numel() for p in projection.parameters())
    log(f"LLaMA dim {llama.args.dim} x {llama.args.n_layers} layers, MP {env.mp_size} x DP {env.dp_size}; "
        f"projection {cfg.projection} ({n_train:,} trainable parameters), prefix {prefix_len}; "
        f"{len(train_set)} training samples, {steps_per_epoch} steps/epoch, global batch {cfg.batch_size}")

    def features_of(batch):
        if "features" in batch:
            return batch["features"]
        return encoder(batch["pixels"])

    def save(epoch_done: int):
        if env.is_main:
            save_training_checkpoint(
                cfg.out_dir, step, projection.state_dict(), optimizer.state_dict(),
                {"epoch": epoch_done, "scheduler": scheduler.state_dict(), "truncated": captioner.truncated},
                dict(cfg.recorded(), clip_identity=meta["clip_identity"], llama_dim=llama.args.dim), cfg.keep_last)
        dist.barrier()

    bad_images, bad_steps, consecutive_bad = [], 0, 0
    last_loss = float("nan")
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        train_set.set_epoch(epoch)
        sampler = StepBatches(len(train_set), micro, cfg.grad_accum, env.dp_size, env.dp_rank, cfg.seed,
                              epoch, start_step=step - epoch * steps_per_epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                             collate_fn=collate)
        bar = tqdm(total=steps_per_epoch, initial=sampler.start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not env.is_main, dynamic_ncols=True, file=sys.stderr)
        it = iter(loader)
        projection.train()
        t_last, samples_since = time.time(), 0
        for _ in range(sampler.start_step, steps_per_epoch):
            micro_batches = [next(it) for _ in range(cfg.grad_accum)]
            for b in micro_batches:
                bad_images += b["bad"]
            # Tokenize once: the step's target count is needed before any loss is computed.
            ids = [captioner.caption_ids(b["caption"]) if b["image_id"] else [] for b in micro_batches]
            counts = torch.tensor([sum(len(x) + 1 for batch_ids in ids for x in batch_ids),
                                   sum(len(b["image_id"]) for b in micro_batches)], dtype=torch.float64,
                                  device=env.device)  # NCCL reduces device tensors only
            dist.all_reduce(counts, group=env.dp_group)
            n_targets, n_samples = float(counts[0]), int(counts[1])
            loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
            for b, batch_ids in zip(micro_batches, ids):
                if not b["image_id"]:
                    continue
                with torch.autocast(env.device.type, dtype=dtype, enabled=use_amp):
                    part, _ = captioner.loss_from_ids(features_of(b), batch_ids)
                scaler.scale(part / n_targets).backward()
                loss_sum += part.detach().double()
            # Sum the gradients of the data-parallel group (one flat buffer, one all-reduce).
            params = [p for p in projection.parameters()]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.flatten() for p in params])
            stats = torch.cat([flat, loss_sum.to(flat.dtype).view(1)])
            if env.dp_size > 1:
                dist.all_reduce(stats, group=env.dp_group)
            offset = 0
            for p in params:
                p.grad.copy_(stats[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            loss = float(stats[-1]) / max(n_targets, 1.0)
            if not math.isfinite(loss):
                bad_steps += 1
                consecutive_bad += 1
                optimizer.zero_grad(set_to_none=True)
                log(f"warning: non-finite loss at step {step + 1}; step skipped")
                if consecutive_bad >= cfg.max_bad_steps:
                    raise UserError(
                        f"the loss was NaN/inf for {consecutive_bad} steps in a row: lower --lr, or use --dtype bf16/fp32; "
                        f"the last good checkpoint is under {cfg.out_dir}/checkpoints"
                    )
                if use_amp:
                    scaler.update()  # the scaler backs off after an overflow
                continue
            consecutive_bad = 0
            scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(projection.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss
            samples_since += n_samples
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                now = time.time()
                rate = samples_since / max(now - t_last, 1e-9)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                metrics.write(step=step, epoch=epoch + 1, loss=loss, lr=lr, samples_per_s=rate)
                t_last, samples_since = now, 0
            if step % cfg.save_every == 0:
                save(epoch)
            if cfg.stop_after_steps and step >= cfg.stop_after_steps:
                bar.close()
                save(epoch if step % steps_per_epoch else epoch + 1)
                log(f"stopped after step {step} (--stop_after_steps); continue with --resume")
                return {"step": step, "loss": last_loss, "stopped": True}
        bar.close()
        del it, loader
        val_loss = evaluate_loss(captioner, val_set, micro, env, cfg, features_of) if val_set else None
        if val_loss is not None:
            log(f"epoch {epoch + 1}: validation loss {val_loss:.4f}")
            metrics.write(step=step, epoch=epoch + 1, val_loss=val_loss)
        save(epoch + 1)
        metrics.plot()

    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in projection.parameters()))
    print(f"[rank {env.rank}] projection sha256 {digest.hexdigest()[:16]}", file=sys.stderr, flush=True)
    bad_total = torch.tensor([len(bad_images), captioner.truncated], dtype=torch.long, device=env.device)
    dist.all_reduce(bad_total, group=env.dp_group)
    for path, reason in bad_images[:20]:
        log(f"warning: skipped unreadable image {path} ({reason})")
    log(f"done: {step} steps, last loss {last_loss:.4f}; {int(bad_total[0])} unreadable image(s) skipped, "
        f"{int(bad_total[1])} caption(s) truncated to --max_caption_len {cfg.max_caption_len}; "
        f"weights in {cfg.out_dir}/checkpoints, curve in {metrics.png}")
    return {"step": step, "loss": last_loss, "bad_images": int(bad_total[0]), "truncated": int(bad_total[1])}


@torch.no_grad()
def evaluate_loss(captioner, dataset, micro, env, cfg, features_of) -> float:
    """Mean per-token validation loss over the whole split, shared out over data-parallel ranks."""
    projection = captioner.projection
    projection.eval()
    idx = list(range(env.dp_rank, len(dataset), env.dp_size))
    batches = [idx[i:i + micro] for i in range(0, len(idx), micro)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                         collate_fn=collate)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for b in tqdm(loader, desc="validation", disable=not env.is_main, leave=False, file=sys.stderr):
        if not b["image_id"]:
            continue
        with torch.autocast(env.device.type, dtype=captioner.llama.dtype, enabled=env.device.type == "cuda"):
            loss, n = captioner.loss_terms(features_of(b), b["caption"])
        total += torch.tensor([float(loss), n], dtype=torch.float64, device=env.device)
    dist.all_reduce(total, group=env.dp_group)
    projection.train()
    return float(total[0] / max(total[1], 1))
