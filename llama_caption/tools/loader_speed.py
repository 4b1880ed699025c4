"""Images/s of the shard loader against the folder loader, on the same images, with the same
decoding (data.open_rgb, the encoder's preprocess) and the same CLIP, and where the time goes.

    python -m llama_caption.tools.loader_speed --images 512 --num_workers 2

It draws --images JPEGs (--size pixels, as img2dataset's default 256), writes them once as a
folder and once as webdataset shards of --per_shard samples (with img2dataset's parquet), builds a
CLIP with ViT-B/32's shape and random weights (--clip_model to use a real file instead), then
times, for each loader: reading only, and reading + CLIP; and single-threaded: the tar reading,
the decoding + preprocessing and the CLIP forward alone. Page cache warm for both.
"""

import functools
import io
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .. import shards
from ..config import Config, command, setting
from ..data import ImageFiles, ImageRecord, collate, open_rgb
from ..vision import EncoderSpec, load_encoder
from .demo.shapes import SHAPE_COLOURS, draw


@dataclass
class LoaderSpeedConfig(Config):
    images: int = setting(512, "images drawn (JPEG, as img2dataset writes them).")
    size: int = setting(256, "image side in pixels.")
    per_shard: int = setting(128, "samples per shard.")
    batch_size: int = setting(32, "images per batch (and per CLIP forward).")
    num_workers: int = setting(2, "DataLoader workers for both loaders.")
    clip_model: Optional[str] = setting(None, "a CLIP file (default: ViT-B/32's shape with random weights, built here).")
    folder: Optional[str] = setting(None, "where to write the images and shards (default: a temporary folder).")
    repeat: int = setting(0, "then this many more alternating reading-only passes of each loader (the spread shows the machine's noise).")

    def check(self) -> None:
        self.at_least(1, "images", "size", "per_shard", "batch_size")
        self.at_least(0, "num_workers", "repeat")


def photo(i: int, size: int) -> bytes:
    """A shape over a noisy gradient, so that the JPEG is about as large as a web photo's."""
    rng = random.Random(i)
    im = draw({"shape": ("circle", "square", "triangle")[i % 3], "colour": SHAPE_COLOURS[i % 5], "background": "white",
               "size": "large"}, size, rng)
    noise = np.random.default_rng(i).normal(0, 18, (size, size, 3))
    ramp = np.linspace(0, 60, size)[None, :, None]
    arr = np.clip(np.asarray(im, dtype=np.float64) - ramp + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_data(cfg: LoaderSpeedConfig, root: str):
    """The same images as ROOT/images/KEY.jpg and as ROOT/shards/NNNNN.tar; returns (records, shard urls)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from webdataset import TarWriter

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    records, urls = [], []
    for s in range(0, cfg.images, cfg.per_shard):
        url = os.path.join(root, "shards", f"{s // cfg.per_shard:05d}.tar")
        keys = []
        with open(url, "wb") as f, TarWriter(f, encoder=False) as sink:
            for i in range(s, min(s + cfg.per_shard, cfg.images)):
                key, jpg = f"{i:09d}", photo(i, cfg.size)
                path = os.path.join(root, "images", key + ".jpg")
                with open(path, "wb") as g:
                    g.write(jpg)
                records.append(ImageRecord(i, path, ["a caption"]))
                sink.write({"__key__": key, "jpg": jpg, "txt": b"a caption", "json": json.dumps({"key": key}).encode()})
                keys.append(key)
        pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}), url[:-4] + ".parquet")
        urls.append(url)
    return records, urls


def timed(batches, encoder=None) -> tuple:
    """(images, seconds) through `batches`, with the CLIP forward when `encoder` is given."""
    n, start = 0, time.perf_counter()
    with torch.no_grad():
        for b in batches:
            if encoder is not None and b["image_id"]:
                encoder(b["pixels"])
            n += len(b["image_id"])
    return n, time.perf_counter() - start


def folder_batches(records, encoder, cfg):
    return torch.utils.data.DataLoader(ImageFiles(records, encoder.preprocess), batch_size=cfg.batch_size,
                                       num_workers=cfg.num_workers, collate_fn=collate)


def shard_batches(urls, encoder, cfg):
    decode = functools.partial(shards.decode, transform=encoder.preprocess, caption_field=None, need_caption=True)
    counts = [shards.count_shard(u) for u in urls]
    data = shards.ShardTraining(urls, [shards.shard_name(u) for u in urls], counts, shards.fingerprint(urls), decode,
                                cfg.batch_size, 1, 1, 0, 0, cfg.num_workers)
    it = data.batches(0, 0)
    return (next(it) for _ in range(data.steps_per_epoch))


def stages(records, urls, encoder, cfg) -> dict:
    """Seconds per image of each stage alone, in this process."""
    t = time.perf_counter()
    raws = [r for u in urls for r in shards.read_shard(u, [])]
    tar = (time.perf_counter() - t) / len(raws)
    t = time.perf_counter()
    for r in records:
        with open(r.path, "rb") as f:
            f.read()
    files = (time.perf_counter() - t) / len(records)
    t = time.perf_counter()
    images = [open_rgb(io.BytesIO(r["jpg"])) for r in raws]
    decode = (time.perf_counter() - t) / len(raws)
    t = time.perf_counter()
    pixels = [encoder.preprocess(im) for im in images]
    prep = (time.perf_counter() - t) / len(raws)
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(pixels), cfg.batch_size):
            encoder(torch.stack(pixels[i:i + cfg.batch_size]))
    clip = (time.perf_counter() - t) / len(pixels)
    return {"tar read (webdataset)": tar, "file read (folder)": files, "JPEG decode (open_rgb)": decode,
            "preprocess (CLIP's)": prep, "CLIP forward": clip}


def run(cfg: LoaderSpeedConfig) -> dict:
    from .testing import build_tiny_clip

    root = cfg.folder or tempfile.mkdtemp(prefix="loader_speed.")
    clip_path = cfg.clip_model or build_tiny_clip(os.path.join(root, "vit_b32_shape.pt"), embed_dim=512, width=768,
                                                  layers=12, patch=32, resolution=224)
    records, urls = write_data(cfg, root)
    encoder = load_encoder(EncoderSpec.of(clip_path), torch.device("cpu"))
    load = os.getloadavg()[0]
    timed(folder_batches(records, encoder, cfg))  # both from the page cache, workers' start-up paid once
    rows = {}
    for name, make in (("folder", lambda: folder_batches(records, encoder, cfg)),
                       ("shards", lambda: shard_batches(urls, encoder, cfg))):
        n, s = timed(make())
        n2, s2 = timed(make(), encoder)
        rows[name] = (n / s, n2 / s2)
    print(f"{cfg.images} JPEGs of {cfg.size}px ({sum(os.path.getsize(r.path) for r in records) / cfg.images / 1024:.1f} "
          f"KiB each), {len(urls)} shard(s); batch {cfg.batch_size}, {cfg.num_workers} worker(s), "
          f"{torch.get_num_threads()} torch thread(s), CLIP {'ViT-B/32 shape' if not cfg.clip_model else clip_path}; "
          f"{os.cpu_count()} CPU(s), load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("loader   images/s reading   images/s reading + CLIP")
    for name, (a, b) in rows.items():
        print(f"{name:<8} {a:>16.1f}   {b:>23.1f}")
    if cfg.repeat:
        again = {name: [] for name in rows}
        for _ in range(cfg.repeat):
            again["folder"].append(timed(folder_batches(records, encoder, cfg)))
            again["shards"].append(timed(shard_batches(urls, encoder, cfg)))
        for name, runs in again.items():
            print(f"{name:<8} reading only, again: " + ", ".join(f"{n / s:.1f}" for n, s in runs) + " images/s")
    print("one process, one stage at a time (ms per image):")
    for name, sec in stages(records, urls, encoder, cfg).items():
        print(f"  {name:<28} {sec * 1000:8.3f}")
    return rows


main = command(LoaderSpeedConfig, run, "Images/s of the shard loader against the folder loader (same images, decoding, CLIP).")

if __name__ == "__main__":
    import fire

    fire.Fire(main)
