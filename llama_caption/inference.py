"""Caption a COCO split or a user's own images; write COCO results; evaluate; draw a gallery.

Results are written as they come: each batch is appended to RESULTS.partial.jsonl (one JSON
object per line) and RESULTS itself is rewritten atomically every `save_every_s` seconds and at
the end. A run started again reads both and captions only the images that are not done. With
data parallelism (world_size > MP) the images are dealt out to the data-parallel groups and the
captions gathered on rank 0, which alone writes.
"""

import html
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import distributed
from .captioner import load_captioner
from .checkpoint import list_shards
from .data import ImageFiles, ImageRecord, collate, list_image_files, load_split
from .errors import UserError
from .evaluation import check_results, format_table, score
from .fileio import write_json, write_text
from .runtime import resolve_dtype


@dataclass
class InferenceConfig:
    ckpt_dir: str
    tokenizer_path: str
    checkpoint: str
    images: object
    out: str = "results.json"
    annotations: Optional[str] = None
    karpathy_split: Optional[str] = None
    split: str = "test"
    num_images: Optional[int] = None
    fraction: Optional[float] = None
    batch_size: int = 32
    max_gen_len: int = 30
    temperature: float = 0.0
    top_p: float = 0.95
    num_beams: int = 1
    length_penalty: float = 1.0
    clip_model: Optional[str] = None
    evaluate: bool = True
    gallery: int = 0
    num_workers: int = 2
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1
    save_every_s: float = 30.0
    control_shuffle: bool = False
    pack_weights: bool = True


def select_records(cfg: InferenceConfig, log) -> (List[ImageRecord], bool):
    """The images to caption, sorted by id, and whether they come with references."""
    if cfg.annotations or cfg.karpathy_split:
        if not isinstance(cfg.images, str):
            raise UserError("--images must be one folder when --annotations or --karpathy_split is given")
        records = load_split(cfg.images, cfg.annotations, cfg.karpathy_split, cfg.split, "--images", "--annotations")
        missing = [r for r in records if not os.path.isfile(r.path)]
        if missing:
            log(f"warning: {len(missing)} annotated image(s) not found, skipped (first: {missing[0].path})")
        records = [r for r in records if os.path.isfile(r.path)]
        annotated = True
    else:
        files = list_image_files(cfg.images)
        records = [ImageRecord(i, p, []) for i, p in enumerate(files)]
        annotated = False
    records.sort(key=lambda r: r.image_id)
    if cfg.num_images is not None and cfg.fraction is not None:
        raise UserError("give --num_images or --fraction, not both")
    if cfg.num_images is not None:
        if cfg.num_images < 1:
            raise UserError(f"--num_images must be at least 1, got {cfg.num_images}")
        records = records[: cfg.num_images]
    if cfg.fraction is not None:
        if not 0 < cfg.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {cfg.fraction}")
        records = records[: max(1, math.ceil(cfg.fraction * len(records)))]
    if not records:
        raise UserError(f"no images to caption in --images {cfg.images}")
    return records, annotated


def result_key(r: Dict, annotated: bool):
    return r["image_id"] if annotated else r["file_name"]


def load_done(out: str, annotated: bool) -> Dict:
    """Captions already written by an earlier run: the results file, then the partial log."""
    done = {}
    if os.path.isfile(out):
        try:
            with open(out, encoding="utf-8") as f:
                previous = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--out {out} exists but is not valid JSON ({e}): move it away or pick another --out") from None
        check_results(previous, out)
        if not annotated and not all("file_name" in r for r in previous):
            raise UserError(f"--out {out} was written for annotated images; pick another --out for your own files")
        done.update({result_key(r, annotated): r for r in previous})
    partial = out + ".partial.jsonl"
    if os.path.isfile(partial):
        with open(partial, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a crash cut short
                done[result_key(r, annotated)] = r
    return done


def write_gallery(path: str, results: List[Dict], records: Dict, n: int) -> None:
    """An HTML page with the first n images (linked relatively), their caption and references."""
    folder = os.path.dirname(os.path.abspath(path))
    rows = []
    for r in results[:n]:
        rec = records[r["image_id"]]
        src = os.path.relpath(os.path.abspath(rec.path), folder)
        refs = "".join(f"<li>{html.escape(c)}</li>" for c in rec.captions)
        rows.append(
            f'<figure><img src="{html.escape(src)}" alt="image {r["image_id"]}">'
            f'<figcaption><b>{html.escape(r["caption"])}</b>'
            f'{"<ul>" + refs + "</ul>" if refs else ""}<small>{html.escape(os.path.basename(rec.path))}</small>'
            f"</figcaption></figure>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>llama_caption gallery</title><style>"
        "body{font-family:sans-serif;margin:20px}figure{display:inline-block;width:260px;vertical-align:top;"
        "margin:8px}img{width:256px;height:auto;image-rendering:pixelated;border:1px solid #ccc}"
        "ul{padding-left:18px;color:#555;font-size:13px}small{color:#999}</style></head><body>"
        f"<h1>Generated captions ({min(n, len(results))} images)</h1>"
        "<p>Bold: the generated caption. Below it: the reference captions.</p>" + "\n".join(rows) + "</body></html>\n"
    )
    write_text(path, page)


def run(cfg: InferenceConfig) -> Optional[Dict]:
    shards = list_shards(cfg.ckpt_dir)
    env = distributed.setup(mp_size=len(shards), device=cfg.device, seed=cfg.seed)
    try:
        return _run(cfg, env)
    finally:
        distributed.teardown()


def _run(cfg: InferenceConfig, env) -> Optional[Dict]:
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if env.is_main else (lambda m: None)
    for name in ("batch_size", "max_gen_len", "num_beams"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.num_beams > 1 and cfg.temperature > 0:
        raise UserError("--num_beams > 1 is beam search, which does not sample: leave --temperature at 0")
    records, annotated = select_records(cfg, log)
    dtype = resolve_dtype(cfg.dtype, env.device)
    captioner, encoder, tcfg = load_captioner(cfg.checkpoint, cfg.ckpt_dir, cfg.tokenizer_path, env.device, dtype,
                                              cfg.max_gen_len, cfg.batch_size * cfg.num_beams, cfg.clip_model)
    if cfg.pack_weights and captioner.llama.pack_weights():
        log("CPU decoding: LLaMA's weights packed for oneDNN (--pack_weights False to save the extra copy)")
    done = load_done(cfg.out, annotated)
    by_id = {r.image_id: r for r in records}
    todo = [r for r in records if (r.image_id if annotated else r.path) not in done]
    log(f"{len(records)} image(s): {len(records) - len(todo)} already captioned in {cfg.out}, {len(todo)} to go; "
        f"{'beam search, ' + str(cfg.num_beams) + ' beams' if cfg.num_beams > 1 else ('sampling' if cfg.temperature > 0 else 'greedy')}, "
        f"MP {env.mp_size} x DP {env.dp_size}")
    mine = todo[env.dp_rank::env.dp_size]
    n_batches = math.ceil(math.ceil(len(todo) / env.dp_size) / cfg.batch_size) if todo else 0
    loader = torch.utils.data.DataLoader(ImageFiles(mine, encoder.preprocess), batch_size=cfg.batch_size,
                                         num_workers=cfg.num_workers, collate_fn=collate)
    it = iter(loader)
    partial = cfg.out + ".partial.jsonl"
    if env.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    sink = open(partial, "a", encoding="utf-8") if env.is_main else None
    bad_all = []
    bar = tqdm(total=len(todo), desc="captioning", unit="img", disable=not env.is_main, dynamic_ncols=True,
               file=sys.stderr)
    last_save = time.time()
    gen = torch.Generator(device=env.device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    for _ in range(n_batches):
        batch = next(it, None) or {"image_id": [], "bad": []}
        local = []
        if batch["image_id"]:
            feats = encoder(batch["pixels"])
            if cfg.control_shuffle:  # each image gets the features of the next one in its batch
                feats = feats.roll(1, dims=0)
            caps = captioner.generate(feats, cfg.max_gen_len, cfg.temperature, cfg.top_p, generator=gen,
                                      num_beams=cfg.num_beams, length_penalty=cfg.length_penalty)
            for image_id, path, cap in zip(batch["image_id"], batch["path"], caps):
                row = {"image_id": int(image_id), "caption": cap}
                if not annotated:
                    row["file_name"] = path
                local.append(row)
        gathered = [None] * env.dp_size
        dist.all_gather_object(gathered, (local, batch["bad"]), group=env.dp_group)
        if env.is_main:
            for rows, bad in gathered:
                bad_all += bad
                for row in rows:
                    done[result_key(row, annotated)] = row
                    sink.write(json.dumps(row) + "\n")
                    if not annotated:
                        print(f"{row['file_name']}\t{row['caption']}", flush=True)
                bar.update(len(rows) + len(bad))
            sink.flush()
            os.fsync(sink.fileno())
            if time.time() - last_save > cfg.save_every_s:
                write_json(cfg.out, ordered(done, records, annotated))
                last_save = time.time()
    bar.close()
    if not env.is_main:
        return None
    results = ordered(done, records, annotated)
    write_json(cfg.out, results)
    sink.close()
    os.remove(partial)
    for path, reason in bad_all:
        log(f"warning: skipped unreadable image {path} ({reason})")
    log(f"wrote {len(results)} caption(s) to {cfg.out}; {len(bad_all)} unreadable image(s) skipped")
    out = {"results": results, "bad": bad_all}
    if cfg.gallery > 0:
        gpath = os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "gallery.html")
        write_gallery(gpath, results, by_id, cfg.gallery)
        log(f"gallery of {min(cfg.gallery, len(results))} image(s): {gpath}")
    if annotated and cfg.evaluate:
        refs = {r.image_id: r.captions for r in records}
        scored = [r for r in results if refs.get(r["image_id"])]
        metrics = score(refs, scored, log=log)
        print(format_table(metrics, len(scored)))
        mpath = os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "metrics.json")
        write_json(mpath, metrics, indent=1)
        log(f"metrics written to {mpath}")
        out["metrics"] = metrics
    return out


def ordered(done: Dict, records: List[ImageRecord], annotated: bool) -> List[Dict]:
    """The results of the requested images, in image-id order (own files: the ids of this run)."""
    out = []
    for r in records:
        row = done.get(r.image_id if annotated else r.path)
        if row is not None:
            out.append(dict(row, image_id=r.image_id))
    return out
