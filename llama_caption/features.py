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

From webdataset shards (`--shards 'cc3m/{00000..00331}.tar'`), the cache holds feature shards
instead: `NNNNN.tar` for the NNNNN-th input shard, each sample `KEY.npy` (the features) with the
input's `KEY.txt` and `KEY.json`, then `NNNNN_stats.json`, each written atomically when its
shard is done; ranks take every world_size-th shard, and a rerun skips the finished ones. meta.json
lists the shards, their sample counts and the input shards' fingerprint, which training checks.
"""

import functools
import glob
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from . import distributed, shards
from .config import command, setting
from .data import ImageFiles, SplitSettings, collate, drop_missing, load_split, report_bad_images
from .errors import UserError
from .fileio import atomic_path, check_output_dir, write_json, write_safetensors
from .vision import EncoderSettings, EncoderSpec, ImageEncoder, load_encoder, same_encoder

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

    def shard_files(self, source_fp: str, flag: str = "--features") -> tuple:
        """(feature shard paths, sample counts) of a cache made from shards whose fingerprint is
        `source_fp`; a cache of an images folder, or of other shards, is refused."""
        listed = self.meta.get("shards")
        if not listed:
            raise UserError(f"{flag} {self.path} holds features of an images folder: with --train_shards give the feature "
                            f"shards extracted from them (python -m llama_caption features --shards ... --out DIR)")
        if self.meta.get("source_fingerprint") != source_fp:
            raise UserError(f"{flag} {self.path} was extracted from other shards than --train_shards (or they changed "
                            f"since): extract the features of these shards again")
        return [os.path.join(self.path, x["file"]) for x in listed], [x["count"] for x in listed]

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
class FeaturesConfig(EncoderSettings, SplitSettings):
    """The encoder (EncoderSettings), the images and their split (SplitSettings), the cache."""

    out: str = setting(help="the cache folder to create (or to finish, after a crash, with the same flags).")
    images: Optional[str] = setting(None, "the images folder (with --karpathy_split: the folder holding train2014/ and val2014/); or --shards.")
    shards: Optional[List[str]] = setting(None, "webdataset tar shards instead of --images ('cc3m/{00000..00331}.tar'; a list, or joined by '::'): --out gets one feature shard per input shard (docs/shards.md).")
    USUAL_SPLIT = "train"
    batch_size: int = setting(64, "images per CLIP forward.")
    num_workers: int = setting(2, "image-decoding processes per rank (0: decode in the main process).")
    chunk: int = setting(50, "batches per part file (a crash loses at most this much work).")
    storage: str = setting("auto", "auto (fp32 for pooled, fp16 for patch), fp32 or fp16.")
    device: str = setting("auto", "auto, cpu or cuda.")

    def check(self) -> None:
        super().check()  # the encoder's flags, then the split's
        self.at_least(1, "batch_size", "chunk")
        self.at_least(0, "num_workers")
        self.one_of("storage", ("auto", "fp32", "fp16"))
        if bool(self.images) == bool(self.shards):
            raise UserError("give the images as --images DIR or as --shards PATTERN, one of the two")
        if self.shards and (self.annotations or self.karpathy_split):
            raise UserError("--shards carry their own captions: leave out --annotations and --karpathy_split")

    @property
    def half(self) -> bool:
        return self.storage == "fp16" or (self.storage == "auto" and self.feature_kind == "patch")

    def settings(self, spec: EncoderSpec) -> dict:
        """What the cache will hold: encoder, images and split, storage."""
        if self.shards:
            urls = shards.expand(self.shards, "--shards")
            return dict(spec.cache_meta(), shards=shards.fingerprint(urls), storage="fp16" if self.half else "fp32")
        return dict(spec.cache_meta(), images=os.path.abspath(self.images), split=self.chosen_split,
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
                and not (k == "clip_identity" and same_encoder(str(before.get(k)), settings[k]))
                # caches made before encoder files were recorded by absolute path (the identity still checks the file)
                and not (k == "clip_model" and isinstance(before.get(k), str)
                         and os.path.abspath(before[k]) == settings[k])]
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
        spec = cfg.encoder_spec()
        encoder = load_encoder(spec, env.device)
        settings = cfg.settings(spec)
        if os.path.isfile(os.path.join(cfg.out, META)):
            FeatureCache(cfg.out).check(spec, "--out")
            if os.path.isfile(os.path.join(cfg.out, SETTINGS)):  # caches of the first version have none
                claim(cfg.out, settings, False)
            print(f"{cfg.out} is already complete")
            return
        if cfg.shards:
            return extract_shards(cfg, env, encoder, spec, settings)
        records = drop_missing(load_split(cfg.images, cfg.annotations, cfg.karpathy_split, cfg.chosen_split, "--images",
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


def extract_shards(cfg: FeaturesConfig, env, encoder: ImageEncoder, spec: EncoderSpec, settings: dict) -> None:
    """One feature shard per input shard not yet done (this rank: every world_size-th), then
    meta.json (rank 0) from their stats."""
    urls = shards.expand(cfg.shards, "--shards")
    os.makedirs(cfg.out, exist_ok=True)
    claim(cfg.out, settings, env.is_main)
    dist.barrier()
    stats = lambda i: os.path.join(cfg.out, f"{i:05d}_stats.json")  # noqa: E731
    todo = [i for i in range(len(urls)) if not os.path.isfile(stats(i))]
    env.log(f"{len(urls)} shard(s): {len(urls) - len(todo)} already extracted in {cfg.out}, {len(todo)} to go")
    decode = functools.partial(shards.decode_keeping, transform=encoder.preprocess)
    names = [shards.shard_name(u) for u in urls]
    stream = shards.ShardStream(urls, names, todo[env.rank::env.world_size], {}, decode, cfg.batch_size)
    process = lambda good: list(encoder(torch.stack([x["pixels"] for x in good])).cpu())  # noqa: E731
    bar = tqdm(desc=f"{cfg.feature_kind} image features", unit="img", disable=not env.is_main, dynamic_ncols=True)
    for s, done, bad, errors in shards.per_shard(shards.chunk_loader(stream, cfg.num_workers), cfg.batch_size, process):
        write_feature_shard(os.path.join(cfg.out, f"{s:05d}.tar"), done, cfg.half)
        write_json(stats(s), {"source": urls[s], "count": len(done), "bad": [[x["bad"], x["reason"]] for x in bad],
                              "errors": errors})
        bar.update(len(done) + len(bad))
    bar.close()
    dist.barrier()
    if env.is_main:
        listed = []
        for i in range(len(urls)):
            with open(stats(i)) as f:
                st = json.load(f)
            listed.append({"file": f"{i:05d}.tar", "source": urls[i], "count": st["count"], "bad": len(st["bad"]),
                           "errors": len(st["errors"])})
        bad = sum(x["bad"] for x in listed)
        write_json(os.path.join(cfg.out, META), dict(spec.cache_meta(), count=sum(x["count"] for x in listed),
                                                     shape=list(encoder.feature_shape), storage=settings["storage"],
                                                     dataset="shards", source_fingerprint=settings["shards"],
                                                     shards=listed), indent=1)
        print(f"wrote {sum(x['count'] for x in listed)} feature vectors in {len(urls)} shard(s) to {cfg.out} ({bad} "
              f"unreadable sample(s) skipped, {sum(1 for x in listed if x['errors'])} shard(s) cut short by read errors)")


def write_feature_shard(path: str, done: list, half: bool) -> None:
    """A tar of KEY.npy (features) with the input sample's KEY.txt and KEY.json, atomically."""
    from webdataset import TarWriter

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0) as sink:
            for item, feats in done:
                buf = io.BytesIO()
                np.save(buf, feats.to(torch.float16 if half else torch.float32).numpy(), allow_pickle=False)
                sink.write({"__key__": item["key"], "npy": buf.getvalue(), **item["keep"]})


main = command(FeaturesConfig, extract, "Extract CLIP features of every image of a split into the folder OUT.")

if __name__ == "__main__":
    from .__main__ import alias

    alias("features", "features")
