"""The training loop behind captioning_training.py: only the projection learns.

World = MP x DP. Every rank of a model-parallel group sees the same micro-batch; data-parallel
groups see different ones. The loss of an optimizer step is divided by the number of target
tokens of the whole step (all micro-batches, all data-parallel ranks), and projection gradients
are summed over the data-parallel group, so any (DP, accumulation) split of one global batch
computes the same update.

The steps, as `train` runs them: check the run folder, read the resume point, `build` the
`Trainer` (models, data, objective, optimizer), then `train_epoch` (a loop of the objective's
steps), validation and a checkpoint per epoch, and `finish`. The loop knows neither objective nor
data source by kind: objectives/ (cross-entropy, SCST) and training_data.py (COCO files, the feature
cache, webdataset shards) are the strategies it calls.
"""

import dataclasses
import hashlib
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

from . import distributed, runs
from .captioner import Captioner, CaptionerSpec, CaptionStyle, check_window
from .config import command, setting
from .dashboard import REPORTERS, check_reporter, open_dashboard
from .data import CAPTION_MODES, CaptionDataset, collate, report_bad_images
from .errors import UserError
from .fileio import check_output_dir, write_json, write_text
from .llama.checkpoint import LlamaSettings, load_llama
from .llama.quantize import describe
from .objectives import Objective, StepResult, check_objective, objective_for
from .projection import PROJECTIONS
from .runtime import DTYPE_NAMES, resolve_dtype
from .scst import BASELINES
from .training_data import TrainingData, open_cache, training_data, validation_set
from .vision import EncoderSettings, EncoderSpec, ImageEncoder, load_encoder, same_encoder

MAX_LR = 1.0  # above it AdamW's steps are as large as the weights: a typo, not a schedule
MAX_WEIGHT_DECAY = 10.0


@dataclass
class TrainConfig(EncoderSettings, LlamaSettings):
    """The LLaMA (LlamaSettings), the encoder (EncoderSettings), then the data, the captioner,
    the objective and the run."""

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
    scst_temperature: float = setting(1.0, "with --objective scst: sampling temperature, above 0 and at most 100 (captions up to --max_caption_len tokens).")
    scst_reward: str = setting("cider", "with --objective scst: the reward of a sampled caption: cider (CIDEr-D against the image's references), clip (CLIP-S from the run's own CLIP: 2.5 x max(cos(image, caption), 0); pooled features) or cider+clip (--scst_cider_weight x CIDEr-D + --scst_clip_weight x CLIP-S).")
    scst_cider_weight: float = setting(1.0, "with --scst_reward cider+clip: the weight of CIDEr-D (at least 0).")
    scst_clip_weight: float = setting(1.0, "with --scst_reward cider+clip: the weight of CLIP-S (at least 0).")
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
        super().check()  # the encoder's flags, then the LLaMA's
        self.at_least(1, "epochs", "batch_size", "grad_accum", "max_caption_len", "log_every", "save_every",
                      "prefix_len", "max_bad_steps", "proj_hidden", "stop_after_steps", "mapper_width", "mapper_layers")
        self.at_least(0, "num_workers", "warmup_steps", "keep_last", "grad_clip", "weight_decay", "min_lr_ratio")
        if not 0 < self.lr <= MAX_LR:
            raise UserError(f"--lr must be above 0 and at most {MAX_LR:g} (AdamW moves each weight by about lr a step), "
                            f"got {self.lr:g}")
        if self.weight_decay > MAX_WEIGHT_DECAY:
            raise UserError(f"--weight_decay must be at most {MAX_WEIGHT_DECAY:g}, got {self.weight_decay:g}")
        if self.min_lr_ratio > 1:
            raise UserError(f"--min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        self.one_of("projection", PROJECTIONS)
        self.one_of("captions", CAPTION_MODES)
        self.one_of("dtype", DTYPE_NAMES)
        self.one_of("scst_baseline", BASELINES)
        self.at_least(1, "scst_samples")
        self.at_least(0, "report_captions")
        self.one_of("report_to", REPORTERS)
        check_reporter(self.report_to)
        if self.projection == "transformer" and self.mapper_width % 64:
            raise UserError(f"--mapper_width {self.mapper_width} must be a multiple of 64: the mapper's heads are 64 wide")
        check_objective(self)  # its name, and the flags it needs (objectives/)
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
    trainer_state: dict  # trainer.json: step, epoch, schedule, the data's position
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
    return ResumePoint(ckpt, weights, *runs.load_trainer_state(ckpt))


@dataclass
class Trainer:
    """What a training run is made of, built once by `build`: the captioner (the frozen LLaMA, the
    projection that learns), the encoder when a split has no feature cache, the data, the
    objective, the optimizer and its schedule."""

    captioner: Captioner
    spec: CaptionerSpec
    encoder: Optional[ImageEncoder]
    data: TrainingData
    val_set: Optional[CaptionDataset]
    objective: Objective
    micro_batch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: torch.dtype
    use_amp: bool
    epochs: int
    grad_clip: float

    @property
    def steps_per_epoch(self) -> int:
        return self.data.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def features_of(self, batch) -> torch.Tensor:
        return batch["features"] if "features" in batch else self.encoder(batch["pixels"])

    def autocast(self):
        """The frozen LLaMA's precision: autocast on CUDA, nothing on the CPU."""
        return torch.autocast(self.captioner.llama.device.type, dtype=self.dtype, enabled=self.use_amp)

    def update(self, loss: float) -> Optional[float]:
        """Clip and apply the summed gradients (or skip the step when the loss is NaN/inf: None)."""
        params = list(self.captioner.projection.parameters())
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            if self.use_amp:
                self.scaler.update()  # the scaler backs off after an overflow
            return None
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def build(cfg: TrainConfig, env, resume: Optional[ResumePoint] = None) -> Trainer:
    """Encoder (when a split has no feature cache), the frozen LLaMA, the projection, the
    objective, the data, the optimizer and its schedule."""
    micro = cfg.micro_batch(env.dp_size)
    spec_in = cfg.encoder_spec()
    encoder, cache, val_cache = features_sources(cfg, env, spec_in)
    shape = encoder.feature_shape if encoder else cache.meta["shape"]
    spec = CaptionerSpec.build(spec_in, shape, cfg.projection, cfg.prefix_len, cfg.proj_hidden,
                               cfg.open().args.dim, CaptionStyle(cfg.lowercase, cfg.drop_period),
                               cfg.mapper_width, cfg.mapper_layers)
    spec = dataclasses.replace(spec, llama_architecture=tuple(cfg.open().architecture()))
    dtype = resolve_dtype(cfg.dtype, env.device, training=True)
    captioner = build_captioner(cfg, env, spec, dtype, resuming=resume is not None)
    objective = objective_for(cfg)
    transform = encoder.preprocess if encoder else None
    data = training_data(cfg, env, cache, transform, micro, objective.captions, resume.trainer_state if resume else None)
    val_set = validation_set(cfg, env, val_cache, transform)
    if data.steps_per_epoch == 0:
        raise UserError(f"the training split has {len(data)} samples, fewer than one --batch_size {cfg.batch_size}")
    optimizer, scheduler = optimizer_and_schedule(cfg, captioner.projection, data.steps_per_epoch * cfg.epochs)
    use_amp = env.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    trainer = Trainer(captioner, spec, encoder, data, val_set, objective, micro, optimizer, scheduler, scaler, dtype,
                      use_amp, cfg.epochs, cfg.grad_clip)
    objective.prepare(trainer, env)
    return trainer


def features_sources(cfg: TrainConfig, env, spec: EncoderSpec) -> tuple:
    """(the encoder, when a split has no feature cache; the --features and --val_features caches)."""
    need_encoder = cfg.features is None or (cfg.val_images is not None and cfg.val_features is None)
    encoder = load_encoder(spec, env.device) if need_encoder else None
    return encoder, open_cache(cfg.features, spec, "--features"), open_cache(cfg.val_features, spec, "--val_features")


def build_captioner(cfg: TrainConfig, env, spec: CaptionerSpec, dtype: torch.dtype, resuming: bool) -> Captioner:
    """The frozen LLaMA and a new projection (--init_from's weights, except when resuming: a
    resumed run's weights come from its own checkpoint)."""
    window = check_window(spec.prefix_len, cfg.max_caption_len, cfg.open(), "--max_caption_len")
    llama, tokenizer = load_llama(cfg.open(), cfg.tokenizer_path, window, device=env.device, dtype=dtype,
                                  quantize=cfg.quantize)
    projection = spec.new_projection()
    if cfg.init_from and not resuming:
        projection.load_state_dict(initial_weights(cfg, spec, env.log), strict=True)
    return Captioner(llama, tokenizer, projection.to(env.device), spec.style)


def optimizer_and_schedule(cfg: TrainConfig, projection: torch.nn.Module, total: int) -> tuple:
    """AdamW, and its linear warm-up (at most a tenth of training) then cosine decay."""
    warmup = min(cfg.warmup_steps, max(1, total // 10)) if cfg.warmup_steps > 0 else 0
    optimizer = torch.optim.AdamW(projection.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, cfg.min_lr_ratio))
    return optimizer, scheduler


def initial_weights(cfg: TrainConfig, spec: CaptionerSpec, log=print) -> dict:
    """The projection of --init_from, refused when it is not the same captioner (encoder,
    feature shape, projection kind and sizes, LLaMA)."""
    ckpt = runs.find_checkpoint(cfg.init_from, "--init_from")
    weights, saved, flags = runs.load_projection(ckpt, "--init_from")
    old_llama = flags.get("ckpt_dir")
    # The LLaMA first: another one changes sizes derived from it (the MLP's hidden width).
    if saved.llama_dim != spec.llama_dim:
        raise UserError(f"--init_from {ckpt} was trained with the LLaMA in {old_llama}, not the one in --ckpt_dir "
                        f"{cfg.ckpt_dir} (widths {saved.llama_dim} and {spec.llama_dim}): train on the same LLaMA")
    runs.check_same_llama(f"--init_from {ckpt}", old_llama, cfg.open(), saved.llama_architecture)
    if flags.get("quantize", "none") != cfg.quantize:  # allowed: the projection saw only activations
        log(f"--init_from {ckpt} was trained with the LLaMA at {describe(flags.get('quantize', 'none'))}; this run "
            f"uses {describe(cfg.quantize)}")
    difference = captioner_difference(spec, saved)
    if difference:
        raise UserError(f"--init_from {ckpt} is another captioner: {difference} (pass the flags it was trained with)")
    return weights


def captioner_difference(spec: CaptionerSpec, saved: CaptionerSpec) -> Optional[str]:
    """The first field in which `saved` is another captioner than `spec` (None: the same one)."""
    mine, theirs = spec.to_dict(), saved.to_dict()
    mine["encoder"].pop("clip_model"), theirs["encoder"].pop("clip_model")  # the same file may have moved
    mine.pop("llama_architecture"), theirs.pop("llama_architecture")  # check_same_llama's (older ones record none)
    if same_encoder(theirs["encoder"]["identity"], mine["encoder"]["identity"]):  # an identity of the older form
        theirs["encoder"]["identity"] = mine["encoder"]["identity"]
    unused = {"linear": ("proj_hidden", "mapper_width", "mapper_layers"), "mlp": ("mapper_width", "mapper_layers"),
              "transformer": ("proj_hidden",)}.get(spec.projection, ())
    diff = [k for k in mine if mine[k] != theirs.get(k) and not (k in unused and mine["projection"] == theirs["projection"])]
    return f"its {diff[0]} is {theirs.get(diff[0])!r}, this run's {mine[diff[0]]!r}" if diff else None


def restore(trainer: Trainer, resume: ResumePoint, env) -> int:
    """Weights, optimizer, schedule and RNG of the resume point; returns its step. (The data's
    position came with the data: training_data.)"""
    trainer.captioner.projection.load_state_dict(resume.weights, strict=True)
    trainer.optimizer.load_state_dict(resume.optimizer_state)
    trainer.scheduler.load_state_dict(resume.trainer_state["scheduler"])
    torch.set_rng_state(resume.rng["rng_cpu"])
    if "rng_cuda" in resume.rng and env.device.type == "cuda":
        torch.cuda.set_rng_state(resume.rng["rng_cuda"])
    env.log(f"resumed from {resume.checkpoint} at step {resume.trainer_state['step']}")
    return resume.trainer_state["step"]


@dataclass
class Progress:
    """What the loop carries between steps and epochs."""

    step: int
    last_loss: float = float("nan")
    consecutive_bad: int = 0
    bad_images: list = field(default_factory=list)


@dataclass
class Throughput:
    """Samples trained since the last logged step, and when that was."""

    since: float = field(default_factory=time.time)
    samples: int = 0

    def rate(self) -> float:
        """Samples per second since the last call."""
        now = time.time()
        rate, self.since, self.samples = self.samples / max(now - self.since, 1e-9), now, 0
        return rate


def save(cfg: TrainConfig, env, trainer: Trainer, step: int, epochs_done: int) -> None:
    state = {"epoch": epochs_done, "scheduler": trainer.scheduler.state_dict(), "truncated": trainer.captioner.truncated,
             **trainer.data.checkpoint_state(epochs_done)}  # every rank: the data's state may gather over them
    if env.is_main:
        runs.save_checkpoint(cfg.out_dir, step, trainer.captioner.projection.state_dict(), trainer.spec, cfg.to_dict(),
                             trainer.optimizer.state_dict(), state, cfg.keep_last)
    dist.barrier()


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


def train_epoch(cfg: TrainConfig, env, trainer: Trainer, epoch: int, progress: Progress,
                metrics: runs.MetricsLog) -> bool:
    """The remaining steps of one epoch; returns True when --stop_after_steps ended the run."""
    start_step = progress.step - epoch * trainer.steps_per_epoch
    it = trainer.data.batches(epoch, start_step)
    trainer.captioner.projection.train()
    meter, used = Throughput(), 0
    with tqdm(total=trainer.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
              disable=not env.is_main, dynamic_ncols=True, file=sys.stderr) as bar:
        for _ in range(start_step, trainer.steps_per_epoch):
            result = take_step(cfg, env, trainer, epoch, progress, [next(it) for _ in range(cfg.grad_accum)])
            used += result.samples
            if result.loss is None and result.samples:  # skipped: a NaN/inf loss
                continue
            progress.step += 1
            bar.update(1)
            report_step(cfg, trainer, epoch, progress.step, result, meter, bar, metrics)
            if save_or_stop(cfg, env, trainer, epoch, progress.step):
                return True
    if used == 0 and start_step < trainer.steps_per_epoch:
        what = f"the json field --caption_field {cfg.caption_field!r}" if cfg.caption_field else "a caption"
        raise UserError(f"epoch {epoch + 1} used no sample: every one was skipped ({len(progress.bad_images)} here; "
                        f"each needs an image and {what}): check the data and the flags")
    return False


def take_step(cfg: TrainConfig, env, trainer: Trainer, epoch: int, progress: Progress,
              micro_batches: List[dict]) -> StepResult:
    """The objective's step over this rank's micro-batches, and what the loop keeps of it: the
    skipped images, --log_samples, the losses (too many NaN/inf ones in a row: an error)."""
    for b in micro_batches:
        progress.bad_images += b["bad"]
    log_samples(cfg, env, progress.step + 1, epoch + 1, micro_batches)
    result = trainer.objective.step(trainer, micro_batches, env, progress.step)
    if result.loss is None and result.samples == 0:  # no sample left on any rank: the step passes, the schedule too
        with warnings.catch_warnings():  # (torch warns of a schedule step with no optimizer step)
            warnings.simplefilter("ignore", UserWarning)
            trainer.scheduler.step()
    elif result.loss is None:
        progress.consecutive_bad += 1
        env.log(f"warning: non-finite loss at step {progress.step + 1}; step skipped")
        if progress.consecutive_bad >= cfg.max_bad_steps:
            raise UserError(
                f"the loss was NaN/inf for {progress.consecutive_bad} steps in a row: lower --lr, or use "
                f"--dtype bf16/fp32; " + last_checkpoint_line(cfg.out_dir))
    else:
        progress.consecutive_bad = 0
        progress.last_loss = result.loss
    return result


def named_once(per_rank: List[list]) -> List[tuple]:
    """Every rank's skipped (name, reason) pairs, each name once (the first reason given for it):
    a sample skipped in every epoch, or by every model-parallel rank, is one warning."""
    seen = {}
    for pairs in per_rank:
        for name, reason in pairs:
            seen.setdefault(name, reason)
    return list(seen.items())


def last_checkpoint_line(out_dir: str) -> str:
    """Where the last good checkpoint is, or that there is none yet (messages name only what exists)."""
    name = runs.latest_name(out_dir)
    if name and os.path.isdir(os.path.join(runs.checkpoints_dir(out_dir), name)):
        return f"the last good checkpoint is {os.path.join(runs.checkpoints_dir(out_dir), name)}"
    return "no checkpoint was saved before it (nothing to resume from)"


def report_step(cfg: TrainConfig, trainer: Trainer, epoch: int, step: int, result: StepResult, meter: Throughput,
                bar, metrics: runs.MetricsLog) -> None:
    """Every --log_every steps (and the last): the progress bar's figures and a metrics.jsonl row."""
    meter.samples += result.samples
    if result.loss is None or (step % cfg.log_every and step != trainer.total_steps):
        return
    rate, lr = meter.rate(), trainer.scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}",
                    **{k: f"{v:.3f}" for k, v in result.extra.items()})
    metrics.write(step=step, epoch=epoch + 1, loss=result.loss, lr=lr, samples_per_s=rate, **result.extra)


def save_or_stop(cfg: TrainConfig, env, trainer: Trainer, epoch: int, step: int) -> bool:
    """A checkpoint every --save_every steps; True when --stop_after_steps ends the run here."""
    if step % cfg.save_every == 0:
        save(cfg, env, trainer, step, epoch)
    if not (cfg.stop_after_steps and step >= cfg.stop_after_steps):
        return False
    if step % trainer.steps_per_epoch:  # at an epoch's end, `train` validates and saves first
        save(cfg, env, trainer, step, epoch)
    return True


def finish(cfg: TrainConfig, env, trainer: Trainer, progress: Progress, metrics: runs.MetricsLog) -> dict:
    """The closing report: a digest of the weights per rank, unreadable images, truncations."""
    params = trainer.captioner.projection.parameters()
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in params))
    print(f"[rank {env.rank}] projection sha256 {digest.hexdigest()[:16]}", file=sys.stderr, flush=True)
    bad_total = torch.tensor([len(progress.bad_images), trainer.captioner.truncated, len(trainer.data.read_errors)],
                             dtype=torch.long, device=env.device)
    dist.all_reduce(bad_total, group=env.dp_group)
    report_bad_images(named_once(distributed.gather_objects(progress.bad_images)), env.log)
    env.log(f"done: {progress.step} steps, last loss {progress.last_loss:.4f}; {int(bad_total[0])} unreadable "
            f"image(s) skipped{trainer.data.error_report(int(bad_total[2]))}, {int(bad_total[1])} caption(s) truncated "
            f"to --max_caption_len {cfg.max_caption_len}; weights in {cfg.out_dir}/checkpoints, curve in {metrics.png}")
    return {"step": progress.step, "loss": progress.last_loss, "bad_images": int(bad_total[0]),
            "truncated": int(bad_total[1]), "shard_errors": int(bad_total[2])}


def train(cfg: TrainConfig) -> dict:
    check_output_dir(cfg.out_dir, "--out_dir")
    if not cfg.resume:
        runs.check_fresh(cfg.out_dir, lambda m: print(m, file=sys.stderr))  # before any rank writes anything
    with distributed.session(cfg.mp_size(), cfg.device, cfg.seed) as env:
        resume = resume_point(cfg) if cfg.resume else None
        trainer = build(cfg, env, resume)
        progress = Progress(restore(trainer, resume, env) if resume else 0)
        resume_step = progress.step if resume else None
        start_samples_log(cfg, env, resume_step)
        metrics = runs.MetricsLog(cfg.out_dir, env.is_main, resume_step,
                                  open_dashboard(cfg.report_to, cfg.out_dir, cfg.to_dict(), resume_step, env.is_main))
        try:
            return train_epochs(cfg, env, trainer, progress, metrics)
        finally:
            metrics.close()


def train_epochs(cfg: TrainConfig, env, trainer: Trainer, progress: Progress, metrics: runs.MetricsLog) -> dict:
    """config.json, then the epochs left (validation and a checkpoint after each), then the report."""
    if env.is_main:
        write_json(os.path.join(cfg.out_dir, "config.json"), cfg.to_dict(), indent=1)
    n_train = sum(p.numel() for p in trainer.captioner.projection.parameters())
    args = trainer.captioner.llama.args
    env.log(f"LLaMA dim {args.dim} x {args.n_layers} layers, MP {env.mp_size} x DP {env.dp_size}; "
            f"projection {cfg.projection} ({n_train:,} trainable parameters), prefix {trainer.spec.prefix_len}; "
            f"{len(trainer.data)} training samples, {trainer.steps_per_epoch} steps/epoch, global batch {cfg.batch_size}")
    if metrics.dashboard is not None:
        env.log(f"dashboard: {metrics.dashboard.folder}" + (f" (tensorboard --logdir {metrics.dashboard.folder})"
                                                             if cfg.report_to == "tensorboard" else ""))
    for epoch in range(progress.step // trainer.steps_per_epoch, cfg.epochs):
        stopped = train_epoch(cfg, env, trainer, epoch, progress, metrics)
        if not stopped or progress.step % trainer.steps_per_epoch == 0:
            end_epoch(cfg, env, trainer, epoch, progress, metrics)
        if stopped:  # a resumed run then logs what an uninterrupted one does
            env.log(f"stopped after step {progress.step} (--stop_after_steps); continue with --resume")
            return {"step": progress.step, "loss": progress.last_loss, "stopped": True}
    return finish(cfg, env, trainer, progress, metrics)


def end_epoch(cfg: TrainConfig, env, trainer: Trainer, epoch: int, progress: Progress,
              metrics: runs.MetricsLog) -> None:
    """The objective's validation logged, a checkpoint, the curve."""
    if trainer.val_set is not None:
        row = trainer.objective.validate(trainer, env)
        env.log(f"epoch {epoch + 1}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in row.items()))
        metrics.write(step=progress.step, epoch=epoch + 1, **row)
    if cfg.report_to != "none" and cfg.report_captions > 0:  # every rank decodes: the LLaMA is model-parallel
        rows = dashboard_captions(trainer, cfg)
        if metrics.dashboard is not None:
            metrics.dashboard.captions(progress.step, rows)
    save(cfg, env, trainer, progress.step, epoch + 1)
    metrics.plot()


@torch.no_grad()
def dashboard_captions(trainer: Trainer, cfg: TrainConfig) -> List[tuple]:
    """(image id, greedy caption, references) of the first --report_captions images of the
    validation split (else of the training split, where it has references), for the dashboard."""
    data = trainer.val_set if trainer.val_set is not None else trainer.data.dataset
    if data is None:  # shards have no references to show beside the captions
        return []
    batch = collate([data[i] for i in data.first_samples()[:cfg.report_captions]])
    if not batch["image_id"]:
        return []
    trainer.captioner.projection.eval()
    with trainer.autocast():
        captions = trainer.captioner.generate(trainer.features_of(batch), cfg.max_caption_len)
    trainer.captioner.projection.train()
    refs = {r.image_id: r.captions for r in data.records}
    return [(i, c, refs[i]) for i, c in zip(batch["image_id"], captions)]


main = command(TrainConfig, train, "Train the projection from frozen CLIP features to frozen LLaMA prefix embeddings.",
               interrupted="the checkpoints saved so far are kept; the same command with --resume goes on from the "
                           "last one")

if __name__ == "__main__":
    from .__main__ import alias

    alias("training", "train")
