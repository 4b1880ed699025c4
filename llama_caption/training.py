"""The training loop behind captioning_training.py: only the projection learns.

World = MP x DP. Every rank of a model-parallel group sees the same micro-batch; data-parallel
groups see different ones. The loss of an optimizer step is divided by the number of target
tokens of the whole step (all micro-batches, all data-parallel ranks), and projection gradients
are summed over the data-parallel group, so any (DP, accumulation) split of one global batch
computes the same update.

The steps, as `train` runs them: check the run folder, read the resume point, `build` the models,
data and optimizer, then `train_epoch` (a loop of `optimizer_step`), validation and a checkpoint
per epoch, and `finish`.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import distributed, runs, shards
from .captioner import Captioner, CaptionerConfig, CaptionStyle, check_window
from .config import command, setting
from .llama.checkpoint import LlamaSettings, load_llama
from .llama.quantize import describe
from .data import CAPTION_MODES, CaptionDataset, StepBatches, collate, drop_missing, load_split, report_bad_images
from .errors import UserError
from .dashboard import REPORTERS, check_reporter, open_dashboard
from .features import FeatureCache
from .fileio import check_output_dir, write_json, write_text
from .llama.generation import generate
from .projection import PROJECTIONS
from .runtime import DTYPE_NAMES, resolve_dtype
from .scst import BASELINES, CiderD, advantages, sample_captions, sample_keys, sequence_logprobs
from .vision import FEATURE_KINDS, EncoderSpec, ImageEncoder, check_encoder_flags, load_encoder, same_encoder


@dataclass
class TrainConfig(LlamaSettings):
    clip_model: str = setting(help="CLIP name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px), a local CLIP file, or open_clip:ARCH (an open_clip model name or model config JSON; weights from --clip_pretrained).")
    out_dir: str = setting(help="the run folder: checkpoints/, metrics.jsonl, loss_curve.png, config.json. A folder that holds a run is only continued, with --resume.")
    train_images: Optional[str] = setting(None, "train2014/ (with --karpathy_split: the folder holding train2014/ and val2014/, or Flickr's folder of images); or --train_shards.")
    train_shards: Optional[List[str]] = setting(None, "webdataset tar shards instead of --train_images (img2dataset's output): 'cc3m/{00000..00331}.tar', several as a list or joined by '::'; pipe: URLs go to webdataset as they are (docs/shards.md).")
    caption_field: Optional[str] = setting(None, "with --train_shards: take each caption from this field of the sample's .json (default: its .txt).")
    samples_per_epoch: Optional[int] = setting(None, "with --train_shards: draw shards at random with replacement (resampled streaming) and call this many samples an epoch (default: each sample once per epoch).")
    log_samples: bool = setting(False, "with --train_shards: write the samples each step used to out_dir/samples/dp-RANK.tsv (step, epoch, shard/key), to check data order.")
    train_annotations: Optional[str] = setting(None, "captions_train2014.json (not needed with --karpathy_split).")
    val_images: Optional[str] = setting(None, "val2014/ for the validation loss after each epoch (optional).")
    val_annotations: Optional[str] = setting(None, "captions_val2014.json.")
    karpathy_split: Optional[str] = setting(None, "Karpathy's dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json: train = train+restval, validation = its val split (--train_images and --val_images: COCO's folder holding train2014/ and val2014/, or Flickr's folder of images).")
    features: Optional[str] = setting(None, "a training feature cache from python -m llama_caption features (else CLIP runs on the fly); with --train_shards, the feature shards extracted from those shards.")
    val_features: Optional[str] = setting(None, "a validation feature cache.")
    clip_pretrained: Optional[str] = setting(None, "with --clip_model open_clip:ARCH: the weights file (open_clip_pytorch_model.bin, .safetensors) or a pretrained tag (downloaded only if not cached).")
    feature_kind: str = setting("pooled", "pooled (CLIP image embedding, ClipCap) or patch (patch tokens, LLaVA).")
    clip_layer: int = setting(-2, "with --feature_kind patch, the block whose output is taken (-2: penultimate).")
    projection: str = setting("mlp", "linear, mlp (Linear-GELU-Linear) or transformer (learned queries and the features through --mapper_layers layers).")
    prefix_len: int = setting(10, "prefix tokens made from a pooled feature (patch features: one per patch, except through the transformer mapper: --prefix_len).")
    proj_hidden: Optional[int] = setting(None, "hidden width of the mlp projection (default: LLaMA's width).")
    mapper_width: int = setting(512, "width of the transformer mapper's layers (--projection transformer; heads of 64).")
    mapper_layers: int = setting(4, "layers of the transformer mapper (--projection transformer).")
    captions: str = setting("all", "all (every caption each epoch, ClipCap) or one (one random caption per image per epoch).")
    lowercase: bool = setting(True, "lowercase captions before training.")
    drop_period: bool = setting(True, "drop a trailing period from captions.")
    max_caption_len: int = setting(48, "caption tokens kept; longer captions are truncated and counted.")
    epochs: int = setting(5, "passes over the training samples.")
    batch_size: int = setting(32, "samples per optimizer step, over all data-parallel ranks and accumulation steps.")
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step.")
    lr: float = setting(1e-4, "peak AdamW learning rate.")
    weight_decay: float = setting(0.01, "AdamW weight decay.")
    warmup_steps: int = setting(200, "linear warm-up steps (at most a tenth of training), then cosine decay.")
    min_lr_ratio: float = setting(0.1, "the final learning rate as a fraction of --lr.")
    grad_clip: float = setting(1.0, "gradient-norm clipping threshold (0: off).")
    dtype: str = setting("auto", "frozen LLaMA precision: auto (fp32 on CPU; bf16, else fp16, with autocast on CUDA), fp32, fp16, bf16 (bf16 on a CPU with AVX-512 bf16 is faster; attention then runs in fp32).")
    num_workers: int = setting(2, "image-loading processes per rank (0: load in the training process).")
    save_every: int = setting(1000, "optimizer steps between checkpoints (one is also written after every epoch).")
    keep_last: int = setting(3, "checkpoints kept in out_dir/checkpoints (0: all); the latest is never deleted.")
    log_every: int = setting(10, "optimizer steps between metrics.jsonl lines and progress-bar updates.")
    max_bad_steps: int = setting(10, "consecutive NaN/inf losses (skipped steps) before training stops with an error.")
    objective: str = setting("xe", "xe (cross-entropy on the reference captions) or scst (self-critical: maximise the CIDEr-D of sampled captions; starts from --init_from).")
    init_from: Optional[str] = setting(None, "a trained run folder (its latest checkpoint) or checkpoint whose projection starts this run, with a fresh optimizer; needed by --objective scst.")
    scst_samples: int = setting(5, "with --objective scst: captions sampled per image per step.")
    scst_baseline: str = setting("mean", "with --objective scst: mean (each sample against the mean reward of the image's other samples) or greedy (against the image's greedy caption).")
    scst_temperature: float = setting(1.0, "with --objective scst: sampling temperature (captions up to --max_caption_len tokens).")
    seed: int = setting(0, "random seed (data order, initialisation), the same on every rank.")
    resume: bool = setting(False, "continue from out_dir/checkpoints/latest with the same configuration.")
    stop_after_steps: Optional[int] = setting(None, "stop (with a checkpoint) after this many steps, e.g. to split a job across allocations.")
    report_to: str = setting("none", "a dashboard beside metrics.jsonl: none, tensorboard (RUN/tensorboard; tensorboard --logdir RUN/tensorboard) or wandb (when installed; WANDB_MODE=offline needs no network). It logs what metrics.jsonl logs and --report_captions captions per epoch.")
    report_captions: int = setting(4, "with --report_to: greedy captions of this many validation images (training images without --val_images) shown per epoch, with their references.")

    # Settings that may change between an interrupted run and its resumption.
    RESUMABLE_CHANGES = ("resume", "stop_after_steps", "num_workers", "save_every", "keep_last",
                         "log_every", "device", "out_dir", "max_bad_steps", "report_to", "report_captions",
                         "log_samples")

    def check(self) -> None:
        super().check()
        self.at_least(1, "epochs", "batch_size", "grad_accum", "max_caption_len", "log_every", "save_every",
                      "prefix_len", "max_bad_steps", "proj_hidden", "stop_after_steps", "mapper_width", "mapper_layers")
        self.at_least(0, "num_workers", "warmup_steps", "keep_last", "grad_clip", "weight_decay", "min_lr_ratio")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.min_lr_ratio > 1:
            raise UserError(f"--min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        self.one_of("feature_kind", FEATURE_KINDS)
        check_encoder_flags(self.clip_model, self.clip_pretrained)
        self.one_of("projection", PROJECTIONS)
        self.one_of("captions", CAPTION_MODES)
        self.one_of("dtype", DTYPE_NAMES)
        self.one_of("objective", ("xe", "scst"))
        self.one_of("scst_baseline", BASELINES)
        self.at_least(1, "scst_samples")
        self.at_least(0, "report_captions")
        self.one_of("report_to", REPORTERS)
        check_reporter(self.report_to)
        if self.projection == "transformer" and self.mapper_width % 64:
            raise UserError(f"--mapper_width {self.mapper_width} must be a multiple of 64: the mapper's heads are 64 wide")
        if self.objective == "scst":
            if not self.init_from:
                raise UserError("--objective scst needs --init_from RUN_DIR: a projection trained with cross-entropy first")
            if self.scst_baseline == "mean" and self.scst_samples < 2:
                raise UserError(f"--scst_samples {self.scst_samples}: the mean baseline needs at least 2 samples per image")
            if self.scst_temperature <= 0:
                raise UserError(f"--scst_temperature must be positive, got {self.scst_temperature}")
        if self.val_images and not (self.val_annotations or self.karpathy_split):
            raise UserError("--val_images needs --val_annotations (or --karpathy_split)")
        self.check_shards()

    def check_shards(self) -> None:
        if bool(self.train_images) == bool(self.train_shards):
            raise UserError("give the training images as --train_images DIR or as --train_shards PATTERN, one of the two")
        self.at_least(1, "samples_per_epoch")
        if not self.train_shards:
            for name in ("caption_field", "samples_per_epoch"):
                if getattr(self, name) is not None:
                    raise UserError(f"--{name} is for --train_shards")
            return
        if self.train_annotations or self.karpathy_split:
            raise UserError("--train_shards carry their own captions: leave out --train_annotations and --karpathy_split "
                            "(validate on COCO with --val_images and --val_annotations)")
        if self.objective == "scst":
            raise UserError("--objective scst needs each image's reference captions: train it on COCO (--train_images), "
                            "not --train_shards")
        if self.captions != "all":
            raise UserError("--captions one is for COCO's several captions per image; a shard sample has one caption")

    def micro_batch(self, dp_size: int) -> int:
        """Samples per rank per micro-batch."""
        if self.batch_size % (dp_size * self.grad_accum):
            raise UserError(f"--batch_size {self.batch_size} must be divisible by data-parallel size {dp_size} "
                            f"x --grad_accum {self.grad_accum}")
        return self.batch_size // (dp_size * self.grad_accum)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class ResumePoint:
    checkpoint: str
    weights: dict
    trainer: dict
    optimizer_state: dict
    rng: dict


def resume_point(cfg: TrainConfig) -> ResumePoint:
    """The latest checkpoint of out_dir, refused when it was trained with other settings."""
    ckpt = runs.find_checkpoint(cfg.out_dir, "--resume: --out_dir")
    weights, _, saved = runs.load_projection(ckpt, "--resume")
    now = cfg.to_dict()
    # A flag added since the checkpoint was written counts as its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {k: saved.get(k, defaults.get(k)) for k in now}
    diff = sorted(k for k in now if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != now[k])
    if diff:
        raise UserError(
            f"--resume: {ckpt} was trained with another configuration "
            f"({', '.join(f'{k}: {saved.get(k)!r} -> {now[k]!r}' for k in diff[:4])}): "
            f"use the same flags, or a new --out_dir"
        )
    trainer, optimizer_state, rng = runs.load_trainer_state(ckpt)
    return ResumePoint(ckpt, weights, trainer, optimizer_state, rng)


@dataclass
class Job:
    """Everything a training run is made of, built once by `build`."""

    captioner: Captioner
    spec: CaptionerConfig
    encoder: Optional[ImageEncoder]
    train_set: "CaptionDataset | shards.ShardTraining"
    val_set: Optional[CaptionDataset]
    micro_batch: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: torch.dtype
    use_amp: bool
    epochs: int
    cider: Optional[CiderD] = None  # SCST's reward, document frequencies from the training references

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def features_of(self, batch) -> torch.Tensor:
        return batch["features"] if "features" in batch else self.encoder(batch["pixels"])


def open_cache(path: Optional[str], spec: EncoderSpec, flag: str) -> Optional[FeatureCache]:
    if not path:
        return None
    cache = FeatureCache(path)
    cache.check(spec, flag)
    return cache


def restrict_to_cache(records, cache, flag, log):
    if cache is None:
        return records
    cache.check_dataset(records[0].dataset, flag)
    kept = [r for r in records if r.image_id in cache]
    if len(kept) < len(records):
        log(f"warning: {len(records) - len(kept)} image(s) have no features in {flag} {cache.path} (unreadable at extraction, or another split); skipped")
    if not kept:
        raise UserError(f"{flag} {cache.path} has features for none of the images of this split")
    return kept


def load_dataset(cfg: TrainConfig, split: str, cache, transform, env) -> CaptionDataset:
    images, annotations = (cfg.train_images, cfg.train_annotations) if split == "train" else (cfg.val_images, cfg.val_annotations)
    records = load_split(images, annotations, cfg.karpathy_split, split, f"--{split}_images", f"--{split}_annotations",
                         env.log)
    records = drop_missing(records, env.log)
    if not records:
        raise UserError(f"--{split}_images {images}: no image with a usable caption (are the captions empty?)")
    records = restrict_to_cache(records, cache, "--features" if split == "train" else "--val_features", env.log)
    mode = ("one" if cfg.objective == "scst" else cfg.captions) if split == "train" else "all"  # SCST: each image once
    return CaptionDataset(records, None if cache else transform, cache, mode, cfg.seed)


def gather_all(obj) -> list:
    """`obj` of every rank, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_counts(urls: List[str], fp: str, env, path: str) -> List[int]:
    """Samples per shard: img2dataset's parquet files where they are, else a counting pass shared
    out over every rank, kept in the run folder (`path`) for a resumed run."""
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("fingerprint") == fp and len(saved.get("counts", [])) == len(urls):
            return saved["counts"]
    if any(shards.parquet_count(u) is None for u in urls):
        env.log(f"counting the samples of {len(urls)} shard(s) (img2dataset's .parquet files beside them spare this pass)")
    mine = {i: shards.count_shard(urls[i]) for i in range(env.rank, len(urls), env.world_size)}
    counts = [0] * len(urls)
    for part in gather_all(mine):
        for i, n in part.items():
            counts[i] = n
    if env.is_main:
        write_json(path, {"fingerprint": fp, "counts": counts})
    return counts


def shard_dataset(cfg: TrainConfig, env, cache, transform, micro: int, saved: Optional[dict]) -> shards.ShardTraining:
    """--train_shards (or the feature shards of --features made from them), split over the
    data-parallel ranks; a resumed run's position checked against them before anything is read."""
    urls = shards.expand(cfg.train_shards, "--train_shards")
    fp, names = shards.fingerprint(urls), [shards.shard_name(u) for u in urls]
    decode = functools.partial(shards.decode, transform=None if cache else transform, caption_field=cfg.caption_field,
                               need_caption=True)
    data = shards.ShardTraining(urls, names, [0] * len(urls), fp, decode, micro, cfg.grad_accum, env.dp_size,
                                env.dp_rank, cfg.seed, cfg.num_workers, cfg.samples_per_epoch)
    data.restore(saved)  # refuses a changed shard list before any counting
    if cache is not None:
        data.urls, counts = cache.shard_files(fp, "--features")
    else:
        counts = None if cfg.samples_per_epoch else shard_counts(urls, fp, env, os.path.join(cfg.out_dir, "shard_counts.json"))
    data.counts, data.owned = counts, shards.assign(counts, env.dp_size) if counts is not None else None
    if counts is not None and not sum(counts):
        raise UserError(f"--train_shards {' '.join(cfg.train_shards)}: the shards hold no sample")
    return data


def build(cfg: TrainConfig, env, resuming: bool = False, saved_shards: Optional[dict] = None) -> Job:
    """Encoder (when a split has no feature cache), the frozen LLaMA, the projection, the data,
    the optimizer and its schedule."""
    micro = cfg.micro_batch(env.dp_size)
    spec_in = EncoderSpec.of(cfg.clip_model, cfg.feature_kind, cfg.clip_layer, cfg.clip_pretrained)
    need_encoder = cfg.features is None or (cfg.val_images is not None and cfg.val_features is None)
    encoder = load_encoder(spec_in, env.device) if need_encoder else None
    cache = open_cache(cfg.features, spec_in, "--features")
    val_cache = open_cache(cfg.val_features, spec_in, "--val_features")
    shape = encoder.feature_shape if encoder else cache.meta["shape"]
    spec = CaptionerConfig.build(spec_in, shape, cfg.projection, cfg.prefix_len, cfg.proj_hidden,
                                 cfg.open().args.dim, CaptionStyle(cfg.lowercase, cfg.drop_period),
                                 cfg.mapper_width, cfg.mapper_layers)
    window = check_window(spec.prefix_len, cfg.max_caption_len, cfg.open(), "--max_caption_len")
    dtype = resolve_dtype(cfg.dtype, env.device, training=True)
    llama, tokenizer = load_llama(cfg.open(), cfg.tokenizer_path, window, device=env.device, dtype=dtype,
                                  quantize=cfg.quantize)
    projection = spec.new_projection()
    if cfg.init_from and not resuming:  # a resumed run's weights come from its own checkpoint
        projection.load_state_dict(initial_weights(cfg, spec, env.log), strict=True)
    projection = projection.to(env.device)
    transform = encoder.preprocess if encoder else None
    if cfg.train_shards:
        train_set = shard_dataset(cfg, env, cache, transform, micro, saved_shards)
        steps_per_epoch = train_set.steps_per_epoch
    else:
        train_set = load_dataset(cfg, "train", cache, transform, env)
        steps_per_epoch = StepBatches(len(train_set), micro, cfg.grad_accum, env.dp_size, env.dp_rank, cfg.seed).steps
    val_set = load_dataset(cfg, "val", val_cache, transform, env) if cfg.val_images else None
    if steps_per_epoch == 0:
        raise UserError(f"the training split has {len(train_set)} samples, fewer than one --batch_size {cfg.batch_size}")
    total = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_steps, max(1, total // 10)) if cfg.warmup_steps > 0 else 0
    optimizer = torch.optim.AdamW(projection.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, cfg.min_lr_ratio))
    use_amp = env.device.type == "cuda"
    job = Job(Captioner(llama, tokenizer, projection, spec.style), spec, encoder, train_set, val_set, micro,
              steps_per_epoch, optimizer, scheduler,
              torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16), dtype, use_amp, cfg.epochs)
    if cfg.objective == "scst":
        job.cider = CiderD({r.image_id: r.captions for r in train_set.records})
        env.log(f"SCST: CIDEr-D reward, document frequencies from the {len(train_set.records)} training images' references")
    return job


def initial_weights(cfg: TrainConfig, spec: CaptionerConfig, log=print) -> dict:
    """The projection of --init_from, refused when it is not the same captioner (encoder,
    feature shape, projection kind and sizes, LLaMA)."""
    ckpt = runs.find_checkpoint(cfg.init_from, "--init_from")
    weights, saved, flags = runs.load_projection(ckpt, "--init_from")
    old_llama = flags.get("ckpt_dir")
    # The LLaMA first: another one changes sizes derived from it (the MLP's hidden width).
    if saved.llama_dim != spec.llama_dim:
        raise UserError(f"--init_from {ckpt} was trained with the LLaMA in {old_llama}, not the one in --ckpt_dir "
                        f"{cfg.ckpt_dir} (widths {saved.llama_dim} and {spec.llama_dim}): train on the same LLaMA")
    runs.check_same_llama(f"--init_from {ckpt}", old_llama, cfg.open())
    if flags.get("quantize", "none") != cfg.quantize:  # allowed: the projection saw only activations
        log(f"--init_from {ckpt} was trained with the LLaMA at {describe(flags.get('quantize', 'none'))}; this run "
            f"uses {describe(cfg.quantize)}")
    mine, theirs = spec.to_dict(), saved.to_dict()
    mine["encoder"].pop("clip_model"), theirs["encoder"].pop("clip_model")  # the same file may have moved
    if same_encoder(theirs["encoder"]["identity"], mine["encoder"]["identity"]):  # an identity of the older form
        theirs["encoder"]["identity"] = mine["encoder"]["identity"]
    unused = {"linear": ("proj_hidden", "mapper_width", "mapper_layers"), "mlp": ("mapper_width", "mapper_layers"),
              "transformer": ("proj_hidden",)}.get(spec.projection, ())
    diff = [k for k in mine if mine[k] != theirs.get(k) and not (k in unused and mine["projection"] == theirs["projection"])]
    if diff:
        k = diff[0]
        raise UserError(f"--init_from {ckpt} is another captioner: its {k} is {theirs.get(k)!r}, this run's {mine[k]!r} "
                        f"(pass the flags it was trained with)")
    return weights


def restore(job: Job, resume: ResumePoint, env) -> int:
    """Weights, optimizer, schedule and RNG of the resume point; returns its step."""
    job.captioner.projection.load_state_dict(resume.weights, strict=True)
    job.optimizer.load_state_dict(resume.optimizer_state)
    job.scheduler.load_state_dict(resume.trainer["scheduler"])
    torch.set_rng_state(resume.rng["rng_cpu"])
    if "rng_cuda" in resume.rng and env.device.type == "cuda":
        torch.cuda.set_rng_state(resume.rng["rng_cuda"])
    env.log(f"resumed from {resume.checkpoint} at step {resume.trainer['step']}")
    return resume.trainer["step"]


def optimizer_step(job: Job, micro_batches: List[dict], env, max_grad_norm: float):
    """One optimizer step over this rank's micro-batches. Returns (loss per target token, samples
    in the global step); the loss is None when it was NaN/inf and the step was skipped, or when no
    rank had a sample (samples 0)."""
    captioner = job.captioner
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
        with torch.autocast(env.device.type, dtype=job.dtype, enabled=job.use_amp):
            part, _ = captioner.loss(job.features_of(b), batch_ids)
        job.scaler.scale(part / n_targets).backward()
        loss_sum += part.detach().double()
    totals = distributed.all_reduce_gradients(list(captioner.projection.parameters()), loss_sum, env.dp_group)
    return apply_update(job, float(totals[0]) / max(n_targets, 1.0), max_grad_norm), n_samples


def apply_update(job: Job, loss: float, max_grad_norm: float) -> Optional[float]:
    """Clip and apply the summed gradients (or skip the step when the loss is NaN/inf: None)."""
    params = list(job.captioner.projection.parameters())
    if not math.isfinite(loss):
        job.optimizer.zero_grad(set_to_none=True)
        if job.use_amp:
            job.scaler.update()  # the scaler backs off after an overflow
        return None
    job.scaler.unscale_(job.optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    return loss


def scst_step(job: Job, micro_batches: List[dict], env, cfg: TrainConfig, step: int):
    """One SCST optimizer step over this rank's micro-batches (scst.py). Returns (loss per sample,
    samples in the global step, {"reward", "sample_len"} means); loss None when non-finite."""
    cap, k = job.captioner, cfg.scst_samples
    tok, llama, dev = cap.tokenizer, cap.llama, env.device
    n_local = sum(len(b["image_id"]) for b in micro_batches)
    count = torch.tensor([float(n_local * k)], dtype=torch.float64, device=dev)
    dist.all_reduce(count, group=env.dp_group)
    n_global = float(count[0])
    stats = torch.zeros(3, dtype=torch.float64, device=dev)  # loss, reward, sampled tokens
    for b in micro_batches:
        if not b["image_id"]:
            continue
        with torch.autocast(dev.type, dtype=job.dtype, enabled=job.use_amp):
            prefix = cap.projection(job.features_of(b).to(dev))
        rows = prefix.repeat_interleave(k, 0)
        keys = sample_keys(cfg.seed, step, b["image_id"], k, dev)
        tokens, ended = sample_captions(llama, rows.detach(), tok.bos_id, tok.eos_id, cfg.max_caption_len, keys,
                                        cfg.scst_temperature)
        ids = [i for i in b["image_id"] for _ in range(k)]
        rewards = torch.tensor(job.cider.scores(ids, [tok.decode(t) for t in tokens]), dtype=torch.float64)
        rewards = rewards.view(len(b["image_id"]), k)
        greedy = None
        if cfg.scst_baseline == "greedy":
            best = generate(llama, [[tok.bos_id]] * len(b["image_id"]), prefix=prefix.detach(), eos_id=tok.eos_id,
                            max_gen_len=cfg.max_caption_len)
            greedy = torch.tensor(job.cider.scores(b["image_id"], [tok.decode(t) for t in best]), dtype=torch.float64)
        adv = advantages(rewards, cfg.scst_baseline, greedy).flatten().to(dev)
        with torch.autocast(dev.type, dtype=job.dtype, enabled=job.use_amp):
            logp = sequence_logprobs(llama, rows, tokens, ended, tok.bos_id, tok.eos_id)
        part = -(adv * logp.double()).sum()
        job.scaler.scale((part / n_global).float()).backward()
        stats += torch.tensor([float(part.detach()), float(rewards.sum()), sum(len(t) for t in tokens)], dtype=torch.float64,
                              device=dev)
    totals = distributed.all_reduce_gradients(list(cap.projection.parameters()), stats, env.dp_group)
    loss = apply_update(job, float(totals[0]) / n_global, cfg.grad_clip)
    return loss, int(n_global) // k, {"reward": float(totals[1]) / n_global, "sample_len": float(totals[2]) / n_global}


@dataclass
class Progress:
    """What the loop carries between steps and epochs."""

    step: int
    last_loss: float = float("nan")
    consecutive_bad: int = 0
    bad_images: list = field(default_factory=list)


def save(cfg: TrainConfig, env, job: Job, step: int, epochs_done: int) -> None:
    trainer = {"epoch": epochs_done, "scheduler": job.scheduler.state_dict(), "truncated": job.captioner.truncated}
    if isinstance(job.train_set, shards.ShardTraining):  # where the epoch stands, over all ranks
        trainer["shards"] = job.train_set.state(epochs_done, gather_all)
    if env.is_main:
        runs.save_checkpoint(cfg.out_dir, step, job.captioner.projection.state_dict(), job.spec, cfg.to_dict(),
                             job.optimizer.state_dict(), trainer, cfg.keep_last)
    dist.barrier()


def epoch_batches(cfg: TrainConfig, env, job: Job, epoch: int, start_step: int):
    """This rank's micro-batches of `epoch` from `start_step` on: cut from the epoch's permutation
    (COCO), or read on from the position of the shards."""
    if isinstance(job.train_set, shards.ShardTraining):
        return job.train_set.batches(epoch, start_step)
    job.train_set.set_epoch(epoch)
    sampler = StepBatches(len(job.train_set), job.micro_batch, cfg.grad_accum, env.dp_size, env.dp_rank, cfg.seed,
                          epoch, start_step=start_step)
    return iter(torch.utils.data.DataLoader(job.train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                            collate_fn=collate))


def samples_log(cfg: TrainConfig, env) -> Optional[str]:
    """--log_samples: this data-parallel rank's file (one writer per model-parallel group)."""
    if not cfg.log_samples or env.mp_rank != 0:
        return None
    return os.path.join(cfg.out_dir, "samples", f"dp-{env.dp_rank:03d}.tsv")


def start_samples_log(cfg: TrainConfig, env, resume_step: Optional[int]) -> None:
    """Drop the lines of steps after the checkpoint a run resumes from (all, for a new run): those
    steps are redone."""
    path = samples_log(cfg, env)
    if path is None:
        return
    kept = []
    if resume_step is not None and os.path.isfile(path):
        with open(path) as f:
            kept = [l for l in f if l.strip() and int(l.split("\t", 1)[0]) <= resume_step]
    write_text(path, "".join(kept))


def log_samples(cfg: TrainConfig, env, step: int, epoch: int, micro_batches: List[dict]) -> None:
    path = samples_log(cfg, env)
    if path:
        with open(path, "a") as f:
            f.writelines(f"{step}\t{epoch}\t{i}\n" for b in micro_batches for i in b["image_id"])


def train_epoch(cfg: TrainConfig, env, job: Job, epoch: int, progress: Progress, metrics: runs.MetricsLog) -> bool:
    """The remaining steps of one epoch; returns True when --stop_after_steps ended the run."""
    start_step = progress.step - epoch * job.steps_per_epoch
    it = epoch_batches(cfg, env, job, epoch, start_step)
    job.captioner.projection.train()
    t_last, samples_since, used = time.time(), 0, 0
    with tqdm(total=job.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
              disable=not env.is_main, dynamic_ncols=True, file=sys.stderr) as bar:
        for _ in range(start_step, job.steps_per_epoch):
            micro_batches = [next(it) for _ in range(cfg.grad_accum)]
            for b in micro_batches:
                progress.bad_images += b["bad"]
            log_samples(cfg, env, progress.step + 1, epoch + 1, micro_batches)
            extra = {}
            if cfg.objective == "scst":
                loss, n_samples, extra = scst_step(job, micro_batches, env, cfg, progress.step)
            else:
                loss, n_samples = optimizer_step(job, micro_batches, env, cfg.grad_clip)
            used += n_samples
            if loss is None and n_samples == 0:  # no sample left on any rank: the step passes, the schedule too
                with warnings.catch_warnings():  # (torch warns of a schedule step with no optimizer step)
                    warnings.simplefilter("ignore", UserWarning)
                    job.scheduler.step()
            elif loss is None:
                progress.consecutive_bad += 1
                env.log(f"warning: non-finite loss at step {progress.step + 1}; step skipped")
                if progress.consecutive_bad >= cfg.max_bad_steps:
                    raise UserError(
                        f"the loss was NaN/inf for {progress.consecutive_bad} steps in a row: lower --lr, or use "
                        f"--dtype bf16/fp32; the last good checkpoint is under {cfg.out_dir}/checkpoints")
                continue
            else:
                progress.consecutive_bad = 0
                progress.last_loss = loss
                samples_since += n_samples
            progress.step += 1
            bar.update(1)
            step = progress.step
            if loss is not None and (step % cfg.log_every == 0 or step == job.total_steps):
                now = time.time()
                rate = samples_since / max(now - t_last, 1e-9)
                lr = job.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}",
                                **{k: f"{v:.3f}" for k, v in extra.items()})
                metrics.write(step=step, epoch=epoch + 1, loss=loss, lr=lr, samples_per_s=rate, **extra)
                t_last, samples_since = now, 0
            if step % cfg.save_every == 0:
                save(cfg, env, job, step, epoch)
            if cfg.stop_after_steps and step >= cfg.stop_after_steps:
                if step % job.steps_per_epoch:  # at an epoch's end, `train` validates and saves first
                    save(cfg, env, job, step, epoch)
                return True
    if used == 0 and start_step < job.steps_per_epoch:
        what = f"the json field --caption_field {cfg.caption_field!r}" if cfg.caption_field else "a caption"
        raise UserError(f"epoch {epoch + 1} used no sample: every one was skipped ({len(progress.bad_images)} here; "
                        f"each needs an image and {what}): check the data and the flags")
    return False


@torch.no_grad()
def evaluate_loss(job: Job, env, num_workers: int) -> float:
    """Mean per-token validation loss over the whole split, shared out over data-parallel ranks."""
    projection = job.captioner.projection
    projection.eval()
    idx = list(range(env.dp_rank, len(job.val_set), env.dp_size))
    batches = [idx[i:i + job.micro_batch] for i in range(0, len(idx), job.micro_batch)]
    loader = torch.utils.data.DataLoader(job.val_set, batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=collate)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for b in tqdm(loader, desc="validation", disable=not env.is_main, leave=False, file=sys.stderr):
        if not b["image_id"]:
            continue
        with torch.autocast(env.device.type, dtype=job.dtype, enabled=job.use_amp):
            loss, n = job.captioner.caption_loss(job.features_of(b), b["caption"])
        total += torch.tensor([float(loss), n], dtype=torch.float64, device=env.device)
    dist.all_reduce(total, group=env.dp_group)
    projection.train()
    return float(total[0] / max(total[1], 1))


@torch.no_grad()
def evaluate_cider(job: Job, env, cfg: TrainConfig) -> float:
    """Mean CIDEr-D (the reward's scorer; document frequencies from the validation references) of
    greedy captions of the validation images, shared out over data-parallel ranks."""
    records = job.val_set.records
    scorer = CiderD({r.image_id: r.captions for r in records})
    firsts = {}
    for index, (i, _) in enumerate(job.val_set.samples):
        firsts.setdefault(i, index)
    mine = [firsts[i] for i in sorted(firsts)][env.dp_rank::env.dp_size]
    batches = [mine[i:i + job.micro_batch] for i in range(0, len(mine), job.micro_batch)]
    loader = torch.utils.data.DataLoader(job.val_set, batch_sampler=batches, num_workers=cfg.num_workers,
                                         collate_fn=collate)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    job.captioner.projection.eval()
    for b in tqdm(loader, desc="validation CIDEr-D", disable=not env.is_main, leave=False, file=sys.stderr):
        if not b["image_id"]:
            continue
        with torch.autocast(env.device.type, dtype=job.dtype, enabled=job.use_amp):
            captions = job.captioner.generate(job.features_of(b), cfg.max_caption_len)
        total += torch.tensor([sum(scorer.scores(b["image_id"], captions)), len(captions)], dtype=torch.float64,
                              device=env.device)
    dist.all_reduce(total, group=env.dp_group)
    job.captioner.projection.train()
    return float(total[0] / max(total[1], 1))


def finish(cfg: TrainConfig, env, job: Job, progress: Progress, metrics: runs.MetricsLog) -> dict:
    """The closing report: a digest of the weights per rank, unreadable images, truncations."""
    params = job.captioner.projection.parameters()
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in params))
    print(f"[rank {env.rank}] projection sha256 {digest.hexdigest()[:16]}", file=sys.stderr, flush=True)
    shard_errors = getattr(job.train_set, "shard_errors", [])
    bad_total = torch.tensor([len(progress.bad_images), job.captioner.truncated, len(shard_errors)], dtype=torch.long,
                             device=env.device)
    dist.all_reduce(bad_total, group=env.dp_group)
    report_bad_images(progress.bad_images, env.log)
    broken = f", {int(bad_total[2])} shard(s) cut short by read errors" if isinstance(job.train_set, shards.ShardTraining) else ""
    env.log(f"done: {progress.step} steps, last loss {progress.last_loss:.4f}; {int(bad_total[0])} unreadable "
            f"image(s) skipped{broken}, {int(bad_total[1])} caption(s) truncated to --max_caption_len "
            f"{cfg.max_caption_len}; weights in {cfg.out_dir}/checkpoints, curve in {metrics.png}")
    return {"step": progress.step, "loss": progress.last_loss, "bad_images": int(bad_total[0]),
            "truncated": int(bad_total[1]), "shard_errors": int(bad_total[2])}


def train(cfg: TrainConfig) -> dict:
    check_output_dir(cfg.out_dir, "--out_dir")
    if not cfg.resume:
        runs.check_fresh(cfg.out_dir, lambda m: print(m, file=sys.stderr))  # before any rank writes anything
    with distributed.session(cfg.mp_size(), cfg.device, cfg.seed) as env:
        resume = resume_point(cfg) if cfg.resume else None
        job = build(cfg, env, resuming=resume is not None, saved_shards=resume.trainer.get("shards") if resume else None)
        progress = Progress(restore(job, resume, env) if resume else 0)
        resume_step = progress.step if resume else None
        start_samples_log(cfg, env, resume_step)
        metrics = runs.MetricsLog(cfg.out_dir, env.is_main, resume_step,
                                  open_dashboard(cfg.report_to, cfg.out_dir, cfg.to_dict(), resume_step, env.is_main))
        try:
            return train_epochs(cfg, env, job, progress, metrics)
        finally:
            metrics.close()


def train_epochs(cfg: TrainConfig, env, job: Job, progress: Progress, metrics: runs.MetricsLog) -> dict:
    """config.json, then the epochs left (validation and a checkpoint after each), then the report."""
    if env.is_main:
        write_json(os.path.join(cfg.out_dir, "config.json"), cfg.to_dict(), indent=1)
    n_train = sum(p.numel() for p in job.captioner.projection.parameters())
    args = job.captioner.llama.args
    env.log(f"LLaMA dim {args.dim} x {args.n_layers} layers, MP {env.mp_size} x DP {env.dp_size}; "
            f"projection {cfg.projection} ({n_train:,} trainable parameters), prefix {job.spec.prefix_len}; "
            f"{len(job.train_set)} training samples, {job.steps_per_epoch} steps/epoch, global batch {cfg.batch_size}")
    if metrics.dashboard is not None:
        env.log(f"dashboard: {metrics.dashboard.folder}" + (f" (tensorboard --logdir {metrics.dashboard.folder})"
                                                             if cfg.report_to == "tensorboard" else ""))
    for epoch in range(progress.step // job.steps_per_epoch, cfg.epochs):
        stopped = train_epoch(cfg, env, job, epoch, progress, metrics)
        if not stopped or progress.step % job.steps_per_epoch == 0:
            end_epoch(cfg, env, job, epoch, progress, metrics)
        if stopped:  # a resumed run then logs what an uninterrupted one does
            env.log(f"stopped after step {progress.step} (--stop_after_steps); continue with --resume")
            return {"step": progress.step, "loss": progress.last_loss, "stopped": True}
    return finish(cfg, env, job, progress, metrics)


def end_epoch(cfg: TrainConfig, env, job: Job, epoch: int, progress: Progress, metrics: runs.MetricsLog) -> None:
    """Validation (loss; for SCST also CIDEr-D) logged, a checkpoint, the curve."""
    if job.val_set is not None:
        row = {"val_loss": evaluate_loss(job, env, cfg.num_workers)}
        if cfg.objective == "scst":
            row["val_cider"] = evaluate_cider(job, env, cfg)
        env.log(f"epoch {epoch + 1}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in row.items()))
        metrics.write(step=progress.step, epoch=epoch + 1, **row)
    if cfg.report_to != "none" and cfg.report_captions > 0:  # every rank decodes: the LLaMA is model-parallel
        rows = dashboard_captions(job, cfg)
        if metrics.dashboard is not None:
            metrics.dashboard.captions(progress.step, rows)
    save(cfg, env, job, progress.step, epoch + 1)
    metrics.plot()


@torch.no_grad()
def dashboard_captions(job: Job, cfg: TrainConfig) -> List[tuple]:
    """(image id, greedy caption, references) of the first --report_captions images of the
    validation split (else of the training split), for the dashboard."""
    data = job.val_set if job.val_set is not None else job.train_set
    if not isinstance(data, CaptionDataset):  # shards have no references to show beside the captions
        return []
    firsts = {}
    for index, (i, _) in enumerate(data.samples):
        firsts.setdefault(i, index)
    batch = collate([data[firsts[i]] for i in sorted(firsts)[:cfg.report_captions]])
    if not batch["image_id"]:
        return []
    job.captioner.projection.eval()
    with torch.autocast(job.captioner.llama.device.type, dtype=job.dtype, enabled=job.use_amp):
        captions = job.captioner.generate(job.features_of(batch), cfg.max_caption_len)
    job.captioner.projection.train()
    refs = {r.image_id: r.captions for r in data.records}
    return [(i, c, refs[i]) for i, c in zip(batch["image_id"], captions)]


main = command(TrainConfig, train, "Train the projection from frozen CLIP features to frozen LLaMA prefix embeddings.")

if __name__ == "__main__":
    from .__main__ import alias

    alias("training", "train")
