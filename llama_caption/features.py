"""CLIP feature cache: run the frozen encoder once over a split, reuse it every epoch.

    torchrun --nproc_per_node 4 -m llama_caption.features --clip_model ViT-B/32 \\
        --images coco/train2014 --annotations coco/annotations/captions_train2014.json \\
        --out features/train2014-B32-pooled

The cache is a folder: `part-RANK-NNNNN.safetensors` files (tensors `features` and
`image_ids`), written atomically every `--chunk` batches, and `meta.json` (CLIP model and its
identity, feature kind, layer, count), written last. Ranks take every world_size-th image. A
crashed run started again skips the images already in its parts. No pickle anywhere.
"""

import glob
import json
import os
import re
import sys
from typing import Dict, Optional

import fire
import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from . import distributed
from .data import ImageFiles, collate, drop_missing, load_split
from .errors import UserError, exit_on_user_error
from .fileio import write_json, write_safetensors
from .vision import ClipEncoder, features_meta

META = "meta.json"


class FeatureCache:
    """Read side: features by image id, rows read lazily from memory-mapped parts."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, META)
        if not os.path.isdir(path):
            raise UserError(f"feature cache {path} does not exist: make it with python -m llama_caption.features")
        if not os.path.isfile(meta_path):
            raise UserError(f"feature cache {path} is incomplete (no {META}): run the same llama_caption.features command again to finish it")
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

    def check(self, encoder_meta: dict, flag: str = "--features") -> None:
        """Refuse a cache made by another CLIP model, feature kind or layer."""
        for key in ("clip_identity", "feature", "clip_layer"):
            if str(self.meta.get(key)) != str(encoder_meta.get(key)):
                raise UserError(
                    f"{flag} {self.path} was made with {key}={self.meta.get(key)!r} "
                    f"(clip_model {self.meta.get('clip_model')!r}) but this run uses {encoder_meta.get(key)!r} "
                    f"(clip_model {encoder_meta.get('clip_model')!r}): extract the features again"
                )

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


@exit_on_user_error
def main(
    clip_model: str,
    images: str,
    out: str,
    annotations: Optional[str] = None,
    karpathy_split: Optional[str] = None,
    split: str = "train",
    feature: str = "pooled",
    clip_layer: int = -2,
    batch_size: int = 64,
    num_workers: int = 2,
    chunk: int = 50,
    storage: str = "auto",
    device: str = "auto",
):
    """Extract CLIP features of every image of a split into the folder OUT.

    Args:
        clip_model: a released CLIP name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px) or a local CLIP file.
        images: the images folder (with --karpathy_split: the folder holding train2014/ and val2014/).
        out: the cache folder to create (or to finish, after a crash).
        annotations: COCO captions JSON (captions_train2014.json, ...); not needed with --karpathy_split.
        karpathy_split: Karpathy's dataset_coco.json; then --split picks train (with restval), val or test.
        split: the Karpathy split to extract.
        feature: pooled (one CLIP embedding per image) or patch (patch tokens of --clip_layer).
        clip_layer: the transformer block whose patch tokens are taken (-2: the penultimate).
        batch_size: images per CLIP forward.
        num_workers: image-decoding processes per rank.
        chunk: batches per part file (a crash loses at most this much work).
        storage: auto (fp32 for pooled, fp16 for patch), fp32 or fp16.
        device: auto, cpu or cuda.
    """
    if storage not in ("auto", "fp32", "fp16"):
        raise UserError(f"--storage {storage!r} must be auto, fp32 or fp16")
    env = distributed.setup(mp_size=1, device=device)
    try:
        encoder = ClipEncoder(clip_model, env.device, feature, clip_layer)
        meta = features_meta(encoder)
        if os.path.isfile(os.path.join(out, META)):
            FeatureCache(out).check(meta, "--out")
            print(f"{out} is already complete")
            return
        records = drop_missing(load_split(images, annotations, karpathy_split, split, "--images", "--annotations"))
        os.makedirs(out, exist_ok=True)
        done = done_ids(out)
        todo = [r for r in records[env.rank::env.world_size] if r.image_id not in done]
        half = storage == "fp16" or (storage == "auto" and feature == "patch")
        loader = torch.utils.data.DataLoader(ImageFiles(todo, encoder.preprocess), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=collate)
        part_no = next_part_number(out, env.rank)
        buf_f, buf_i, bad = [], [], []

        def flush():
            nonlocal part_no, buf_f, buf_i
            if buf_i:
                feats = torch.cat(buf_f).to(torch.float16 if half else torch.float32)
                write_safetensors(os.path.join(out, f"part-{env.rank:03d}-{part_no:05d}.safetensors"),
                                  {"features": feats, "image_ids": torch.tensor(buf_i, dtype=torch.long)})
                part_no += 1
            buf_f, buf_i = [], []

        bar = tqdm(loader, desc=f"CLIP {feature} features", unit="batch", disable=not env.is_main,
                   dynamic_ncols=True)
        for n, batch in enumerate(bar, 1):
            bad += batch["bad"]
            if batch["image_id"]:
                buf_f.append(encoder(batch["pixels"]).cpu())
                buf_i += batch["image_id"]
            if n % chunk == 0:
                flush()
        flush()
        counts = torch.tensor([len(bad)], dtype=torch.long, device=env.device)  # NCCL reduces device tensors only
        dist.all_reduce(counts)
        for path, reason in bad:
            print(f"warning: skipped unreadable image {path} ({reason})", file=sys.stderr)
        dist.barrier()
        if env.is_main:
            total = len(done_ids(out))
            write_json(os.path.join(out, META), dict(meta, count=total, shape=list(encoder.feature_shape),
                                                     storage="fp16" if half else "fp32"), indent=1)
            print(f"wrote {total} feature vectors to {out} ({int(counts)} unreadable image(s) skipped)")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    fire.Fire(main)
