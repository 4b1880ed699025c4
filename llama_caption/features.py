"""CLIP feature cache: run the frozen encoder once over a split, reuse it every epoch.

    torchrun --nproc_per_node 4 -m llama_caption features --clip_model ViT-B/32 \\
        --images coco/train2014 --annotations coco/annotations/captions_train2014.json \\
        --out features/train2014-B32-pooled

The cache is a folder: `settings.json` (what is being extracted, written first),
`part-RANK-NNNNN.safetensors` files (tensors `features` and `image_ids`), written atomically
every `--chunk` batches, and `meta.json` (CLIP model and its identity, feature kind, layer,
count), written last. Ranks take every world_size-th image. A crashed run started again with
the same settings skips the images already in its parts; other settings are refused, so a
cache never mixes two encoders or two splits. No pickle anywhere.
"""

import glob
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from . import distributed
from .config import Config, command, setting
from .data import ImageFiles, collate, drop_missing, load_split, report_bad_images
from .errors import UserError
from .fileio import check_output_dir, write_json, write_safetensors
from .vision import FEATURE_KINDS, EncoderSpec, ImageEncoder, check_encoder_flags, load_encoder, same_encoder

META = "meta.json"
SETTINGS = "settings.json"


class FeatureCache:
    """Read side: features by image id, rows read lazily from memory-mapped parts."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, META)
        if not os.path.isdir(path):
            raise UserError(f"feature cache {path} does not exist: make it with python -m llama_caption features")
        if not os.path.isfile(meta_path):
            raise UserError(f"feature cache {path} is incomplete (no {META}): run the same python -m llama_caption features command again to finish it")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.path = path
        self.index: Dict[int, tuple] = {}
        self.parts = sorted(glob.glob(os.path.join(path, "part-*.safetensors")))
        for p, part in enumerate(self.parts):
            with safe_open(part, "pt") as f:
                for row, image_id in enumerate(f.get_tensor("image_ids").tolist()):
                    self.index[int(image_id)] = (p, row)
        self._handles = {}

    def check(self, spec: EncoderSpec, flag: str = "--features") -> None:
        """Refuse a cache made by another CLIP model, feature kind or layer."""
        want = spec.cache_meta()
        for key in ("clip_identity", "feature", "clip_layer"):
            same = same_encoder(str(self.meta.get(key)), want[key]) if key == "clip_identity" else \
                str(self.meta.get(key)) == str(want[key])
            if not same:
                raise UserError(
                    f"{flag} {self.path} was made with {key}={self.meta.get(key)!r} "
                    f"(clip_model {self.meta.get('clip_model')!r}) but this run uses {want[key]!r} "
                    f"(clip_model {spec.clip_model!r}): extract the features again"
                )

    def check_dataset(self, dataset: str, flag: str = "--features") -> None:
        """Image ids are only unique within one dataset (Flickr's imgid 0, 1, ... are COCO ids too):
        refuse a cache of another dataset's images. Caches written before it was recorded are COCO's."""
        made = self.meta.get("dataset", "coco")
        if made != dataset:
            raise UserError(f"{flag} {self.path} holds features of {made} images but this split is {dataset}'s: their "
                            f"image ids collide: extract the features of this split with the same --annotations or "
                            f"--karpathy_split")

    def __contains__(self, image_id) -> bool:
        return int(image_id) in self.index

    def __len__(self):
        return len(self.index)

    def get(self, image_id: int) -> torch.Tensor:
        p, row = self.index[int(image_id)]
        if p not in self._handles:  # opened lazily: each DataLoader worker gets its own handles
            self._handles[p] = safe_open(self.parts[p], "pt")
        return self._handles[p].get_slice("features")[row].float()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def done_ids(out: str) -> set:
    ids = set()
    for part in glob.glob(os.path.join(out, "part-*.safetensors")):
        with safe_open(part, "pt") as f:
            ids.update(f.get_tensor("image_ids").tolist())
    return ids


def next_part_number(out: str, rank: int) -> int:
    nums = [int(m.group(1)) for p in glob.glob(os.path.join(out, f"part-{rank:03d}-*.safetensors"))
            if (m := re.search(r"-(\d+)\.safetensors$", p))]
    return max(nums, default=-1) + 1


@dataclass
class FeaturesConfig(Config):
    clip_model: str = setting(help="a released CLIP name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px), a local CLIP file, or open_clip:ARCH (with --clip_pretrained).")
    images: str = setting(help="the images folder (with --karpathy_split: the folder holding train2014/ and val2014/).")
    out: str = setting(help="the cache folder to create (or to finish, after a crash, with the same flags).")
    clip_pretrained: Optional[str] = setting(None, "with --clip_model open_clip:ARCH: the weights file or a pretrained tag.")
    annotations: Optional[str] = setting(None, "COCO captions JSON (captions_train2014.json, ...); not needed with --karpathy_split.")
    karpathy_split: Optional[str] = setting(None, "Karpathy's dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json; then --split picks train (with restval), val or test.")
    split: str = setting("train", "the Karpathy split to extract.")
    feature_kind: str = setting("pooled", "pooled (one CLIP embedding per image) or patch (patch tokens of --clip_layer).")
    clip_layer: int = setting(-2, "the transformer block whose patch tokens are taken (-2: the penultimate).")
    batch_size: int = setting(64, "images per CLIP forward.")
    num_workers: int = setting(2, "image-decoding processes per rank (0: decode in the main process).")
    chunk: int = setting(50, "batches per part file (a crash loses at most this much work).")
    storage: str = setting("auto", "auto (fp32 for pooled, fp16 for patch), fp32 or fp16.")
    device: str = setting("auto", "auto, cpu or cuda.")

    def check(self) -> None:
        self.at_least(1, "batch_size", "chunk")
        self.at_least(0, "num_workers")
        self.one_of("storage", ("auto", "fp32", "fp16"))
        self.one_of("feature_kind", FEATURE_KINDS)
        check_encoder_flags(self.clip_model, self.clip_pretrained)

    @property
    def half(self) -> bool:
        return self.storage == "fp16" or (self.storage == "auto" and self.feature_kind == "patch")

    def settings(self, spec: EncoderSpec) -> dict:
        """What the cache will hold: encoder, images and split, storage."""
        return dict(spec.cache_meta(), images=os.path.abspath(self.images), split=self.split,
                    annotations=os.path.abspath(self.annotations) if self.annotations else None,
                    karpathy_split=os.path.abspath(self.karpathy_split) if self.karpathy_split else None,
                    storage="fp16" if self.half else "fp32")


def claim(out: str, settings: dict, is_main: bool) -> None:
    """Start a cache in `out`, or continue one made with the same settings; refuse others."""
    path = os.path.join(out, SETTINGS)
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        diff = [k for k in settings if before.get(k) != settings[k]
                and not (k == "clip_identity" and same_encoder(str(before.get(k)), settings[k]))]
        if diff:
            k = diff[0]
            raise UserError(f"--out {out} holds features made with other settings ({k}: {before.get(k)!r} -> "
                            f"{settings[k]!r}): pick another --out, or use the flags it was started with")
    elif glob.glob(os.path.join(out, "part-*.safetensors")):
        raise UserError(f"--out {out} holds feature parts of unknown origin: pick another --out")
    elif is_main:
        write_json(path, settings, indent=1)


def extract(cfg: FeaturesConfig) -> None:
    check_output_dir(cfg.out, "--out")
    with distributed.session(mp_size=1, device=cfg.device) as env:
        spec = EncoderSpec.of(cfg.clip_model, cfg.feature_kind, cfg.clip_layer, cfg.clip_pretrained)
        encoder = load_encoder(spec, env.device)
        settings = cfg.settings(spec)
        if os.path.isfile(os.path.join(cfg.out, META)):
            FeatureCache(cfg.out).check(spec, "--out")
            if os.path.isfile(os.path.join(cfg.out, SETTINGS)):  # caches of the first version have none
                claim(cfg.out, settings, False)
            print(f"{cfg.out} is already complete")
            return
        records = drop_missing(load_split(cfg.images, cfg.annotations, cfg.karpathy_split, cfg.split, "--images",
                                          "--annotations", env.log), env.log, need_captions=False)
        os.makedirs(cfg.out, exist_ok=True)
        claim(cfg.out, settings, env.is_main)
        dist.barrier()
        done = done_ids(cfg.out)
        todo = [r for r in records[env.rank::env.world_size] if r.image_id not in done]
        bad = extract_parts(cfg, env, encoder, todo)
        counts = torch.tensor([len(bad)], dtype=torch.long, device=env.device)  # NCCL reduces device tensors only
        dist.all_reduce(counts)
        report_bad_images(bad, lambda m: print(m, file=sys.stderr))
        dist.barrier()
        if env.is_main:
            total = len(done_ids(cfg.out))
            write_json(os.path.join(cfg.out, META), dict(spec.cache_meta(), count=total, shape=list(encoder.feature_shape),
                                                         storage=settings["storage"],
                                                         dataset=records[0].dataset if records else "coco"), indent=1)
            print(f"wrote {total} feature vectors to {cfg.out} ({int(counts)} unreadable image(s) skipped)")


def extract_parts(cfg: FeaturesConfig, env, encoder: ImageEncoder, todo) -> list:
    """This rank's features, a part file every `chunk` batches; returns the unreadable images."""
    loader = torch.utils.data.DataLoader(ImageFiles(todo, encoder.preprocess), batch_size=cfg.batch_size,
                                         num_workers=cfg.num_workers, collate_fn=collate)
    part_no = next_part_number(cfg.out, env.rank)
    feats, ids, bad = [], [], []

    def flush():
        nonlocal part_no, feats, ids
        if ids:
            stacked = torch.cat(feats).to(torch.float16 if cfg.half else torch.float32)
            write_safetensors(os.path.join(cfg.out, f"part-{env.rank:03d}-{part_no:05d}.safetensors"),
                              {"features": stacked, "image_ids": torch.tensor(ids, dtype=torch.long)})
            part_no += 1
        feats, ids = [], []

    bar = tqdm(loader, desc=f"{cfg.feature_kind} image features", unit="batch", disable=not env.is_main,
               dynamic_ncols=True)
    for n, batch in enumerate(bar, 1):
        bad += batch["bad"]
        if batch["image_id"]:
            feats.append(encoder(batch["pixels"]).cpu())
            ids += batch["image_id"]
        if n % cfg.chunk == 0:
            flush()
    flush()
    return bad


main = command(FeaturesConfig, extract, "Extract CLIP features of every image of a split into the folder OUT.")

if __name__ == "__main__":
    from .__main__ import alias

    alias("features", "features")
