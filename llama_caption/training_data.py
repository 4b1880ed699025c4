"""Training data behind one interface, whatever it is read from.

The loop (training.py) asks a `TrainingData` for an epoch's micro-batches from a step on, the
steps an epoch has, what a checkpoint records of where the epoch stands, and the read errors
to report. Two sources give it:

- `ImageCaptions`: images with their captions (COCO, Karpathy's splits, Flickr), read as files
  or from a feature cache (data.CaptionDataset). Each epoch is one seeded permutation cut into
  steps (data.StepBatches), so its step alone says where it stands.
- `shards.ShardTraining`: webdataset shards (or the feature shards made from them), each rank
  reading its own shards; where the epoch stands is recorded in the checkpoint.

`training_data` builds the one a run's flags name, complete: a resumed run's source is built
from its checkpoint's record (`saved`), checked before any sample is read.
"""

import functools
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Protocol

import torch

from . import shards
from .data import CaptionDataset, StepBatches, collate, drop_missing, load_split
from .distributed import gather_objects
from .errors import UserError
from .features import FeatureCache
from .fileio import write_json
from .vision import EncoderSpec


class TrainingData(Protocol):
    # The images with their references (SCST's reward, the dashboard's captions); None for a stream.
    dataset: Optional[CaptionDataset]

    def __len__(self) -> int:
        """Samples an epoch."""

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps an epoch: the same on every rank."""

    @property
    def read_errors(self) -> List[str]:
        """This rank's sources cut short by read errors so far."""

    def batches(self, epoch: int, start_step: int) -> Iterator[dict]:
        """This rank's micro-batches of `epoch` from optimizer step `start_step` on (data.collate's
        batches; an empty one where this rank has no sample left)."""

    def checkpoint_state(self, epochs_done: int) -> dict:
        """What trainer.json records of where the epoch stands (its own keys; every rank calls it)."""

    def error_report(self, total: int) -> str:
        """The closing report's words for `total` read errors over all ranks ('' where none can occur)."""


@dataclass
class ImageCaptions:
    dataset: CaptionDataset
    micro: int  # samples per rank per micro-batch
    accum: int
    dp_size: int
    dp_rank: int
    seed: int
    num_workers: int

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler(0).steps

    @property
    def read_errors(self) -> List[str]:
        return []

    def sampler(self, epoch: int, start_step: int = 0) -> StepBatches:
        return StepBatches(len(self.dataset), self.micro, self.accum, self.dp_size, self.dp_rank, self.seed, epoch,
                           start_step=start_step)

    def batches(self, epoch: int, start_step: int) -> Iterator[dict]:
        self.dataset.set_epoch(epoch)
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler(epoch, start_step),
                                                num_workers=self.num_workers, collate_fn=collate))

    def checkpoint_state(self, epochs_done: int) -> dict:
        return {}  # the step says it

    def error_report(self, total: int) -> str:
        return ""


def training_data(cfg, env, cache: Optional[FeatureCache], transform, micro: int, captions: str,
                  saved: Optional[dict]) -> TrainingData:
    """The training split of --train_shards or --train_images (the one place that tells them
    apart). captions: the objective's caption mode; saved: the trainer state of the checkpoint a
    run resumes from."""
    if cfg.train_shards:
        return shard_training(cfg, env, cache, transform, micro, (saved or {}).get(shards.CHECKPOINT_KEY))
    dataset = load_dataset(cfg, "train", cache, transform, env, captions)
    return ImageCaptions(dataset, micro, cfg.grad_accum, env.dp_size, env.dp_rank, cfg.seed, cfg.num_workers)


def validation_set(cfg, env, cache: Optional[FeatureCache], transform) -> Optional[CaptionDataset]:
    """--val_images (every caption of every image), or None."""
    return load_dataset(cfg, "val", cache, transform, env, "all") if cfg.val_images else None


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


def load_dataset(cfg, split: str, cache, transform, env, captions: str) -> CaptionDataset:
    images, annotations = (cfg.train_images, cfg.train_annotations) if split == "train" else (cfg.val_images, cfg.val_annotations)
    records = load_split(images, annotations, cfg.karpathy_split, split, f"--{split}_images", f"--{split}_annotations",
                         env.log)
    records = drop_missing(records, env.log)
    if not records:
        raise UserError(f"--{split}_images {images}: no image with a usable caption (are the captions empty?)")
    records = restrict_to_cache(records, cache, "--features" if split == "train" else "--val_features", env.log)
    return CaptionDataset(records, None if cache else transform, cache, captions, cfg.seed)


def shard_training(cfg, env, cache, transform, micro: int, saved: Optional[dict]) -> shards.ShardTraining:
    """--train_shards (or the feature shards of --features made from them), split over the
    data-parallel ranks, from where `saved` (a checkpoint's record) stood; a record of other
    shards is refused before anything is counted or read."""
    urls = shards.expand(cfg.train_shards, "--train_shards")
    fp = shards.fingerprint(urls)
    restored = shards.resume_position(saved, fp, env.dp_size)
    read, counts = shard_files(cfg, env, cache, urls, fp)
    if counts is not None and not sum(counts):
        raise UserError(f"--train_shards {' '.join(cfg.train_shards)}: the shards hold no sample")
    decode = functools.partial(shards.decode, transform=None if cache else transform, caption_field=cfg.caption_field,
                               need_caption=True)
    return shards.ShardTraining(read, [shards.shard_name(u) for u in urls], counts, fp, decode, micro, cfg.grad_accum,
                                env.dp_size, env.dp_rank, cfg.seed, cfg.num_workers, cfg.samples_per_epoch,
                                restored=restored)


def shard_files(cfg, env, cache, urls: List[str], fp: str) -> tuple:
    """(the files read, samples per file): the feature shards of --features, else the shards with
    their counts (None for resampled streaming, which needs none)."""
    if cache is not None:
        return cache.shard_files(fp, "--features")
    if cfg.samples_per_epoch:
        return urls, None
    return urls, shard_counts(urls, fp, env, os.path.join(cfg.out_dir, "shard_counts.json"))


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
    for part in gather_objects(mine):
        for i, n in part.items():
            counts[i] = n
    if env.is_main:
        write_json(path, {"fingerprint": fp, "counts": counts})
    return counts
