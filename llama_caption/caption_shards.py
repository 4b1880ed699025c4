"""`caption --shards`: webdataset tar shards captioned into one results file per shard (docs/shards.md).

The shards not yet captioned in --out (by the same settings: OUT/run.json records them) are
dealt out over the data-parallel groups; each group's first model-parallel rank writes a shard's
results, atomically, once its last sample is captioned. `cfg` is inference.InferenceConfig.
"""

import functools
import json
import os
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import distributed, shards
from .errors import UserError
from .fileio import atomic_path, check_output_dir, write_json, write_text
from .llama.decoding import Decoding
from .opening import OpenedCaptioner, open_captioner
from .results import first_difference


def shard_results(out: str, urls: List[str], fmt: str) -> List[str]:
    """The results file of each shard: OUT/NAME.jsonl (or .parquet) for NAME.tar."""
    paths = [os.path.join(out, os.path.splitext(shards.shard_name(u))[0] + "." + fmt) for u in urls]
    if len(set(paths)) < len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise UserError(f"--shards: two shards have the name of {os.path.basename(twice)}; their results would share a "
                        f"file: caption them into separate --out folders")
    return paths


def write_shard_results(path: str, rows: List[Dict], fmt: str) -> None:
    """One shard's captions, atomically."""
    if fmt == "jsonl":
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": pa.array([r["key"] for r in rows], pa.string()),
                      "caption": pa.array([r["caption"] for r in rows], pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


RESULT_FORMATS = (".jsonl", ".parquet")


def held_results(out: str) -> List[str]:
    """The shard results files in --out, of either format (whatever shards they came from)."""
    if not os.path.isdir(out):
        return []
    return sorted(f for f in os.listdir(out) if f.endswith(RESULT_FORMATS) and not f.startswith("."))


def claim_shard_results(cfg, paths: List[str], made_by: dict) -> set:
    """The shards already captioned in --out by the same settings. Results of other settings
    (another format included) are refused; with --overwrite every shard is done again and the
    folder's results files are removed first (`clear_shard_results`), so that one folder never
    holds two settings' captions."""
    run_file = os.path.join(cfg.out, "run.json")
    held = held_results(cfg.out)
    if cfg.overwrite:
        return set()
    if os.path.isfile(run_file):
        with open(run_file, encoding="utf-8") as f:
            diff = first_difference(json.load(f), made_by)
        if diff and held:
            raise UserError(f"--out {cfg.out} holds captions made with other settings ({diff}): pick another --out to "
                            f"keep both, or add --overwrite to replace them (every results file in it is removed)")
    elif held:
        raise UserError(f"--out {cfg.out} holds results files but no run.json says what made them: pick another --out, "
                        f"or add --overwrite")
    return {i for i, p in enumerate(paths) if os.path.isfile(p)}


def clear_shard_results(out: str) -> int:
    """--overwrite: remove the folder's results files (rank 0, before anything new is written)."""
    held = held_results(out)
    for name in held:
        os.unlink(os.path.join(out, name))
    return len(held)


def caption_shards(cfg) -> Dict:
    """Caption --shards: shards not yet done are dealt out over the data-parallel groups, each
    group's first model-parallel rank writing a shard's results when its last sample is captioned."""
    urls = shards.expand(cfg.shards, "--shards")
    check_output_dir(cfg.out, "--out")
    paths = shard_results(cfg.out, urls, cfg.out_format)
    with distributed.session(cfg.mp_size(), cfg.device, cfg.seed) as env:
        decoding = cfg.decoding()
        opened = open_captioner(cfg, env, decoding, cfg.batch_size)
        made_by = opened.provenance(decoding, {"out_format": cfg.out_format})
        done = claim_shard_results(cfg, paths, made_by)
        dist.barrier()  # every rank has seen what is done before rank 0 writes anything
        if env.is_main:
            if cfg.overwrite:
                removed = clear_shard_results(cfg.out)
                if removed:
                    env.log(f"--overwrite: removed the {removed} results file(s) in {cfg.out}")
            write_json(os.path.join(cfg.out, "run.json"), made_by, indent=1)
        dist.barrier()  # nothing is written before the old results are gone
        todo = [i for i in range(len(urls)) if i not in done]
        env.log(f"{len(urls)} shard(s): {len(done)} already captioned in {cfg.out}, {len(todo)} to go; "
                f"MP {env.mp_size} x DP {env.dp_size}")
        counts = caption_my_shards(cfg, env, opened, decoding, urls, paths, todo[env.dp_rank::env.dp_size])
        totals = torch.tensor(counts, dtype=torch.long, device=env.device)
        dist.all_reduce(totals)
        shards_done, images, bad, errors = (int(t) // env.mp_size for t in totals)
        env.log(f"captioned {images} image(s) in {shards_done} shard(s) into {cfg.out}; {bad} unreadable sample(s) "
                f"skipped" + (f"; {errors} shard(s) could not be read to their end and have no results file "
                              f"(rerun to retry them)" if errors else ""))
        return {"shards": shards_done, "images": images, "bad": bad, "shard_errors": errors}


def caption_my_shards(cfg, env, opened: OpenedCaptioner, decoding: Decoding, urls, paths,
                      mine: List[int]) -> List[int]:
    """This data-parallel group's shards; returns [shards, images, unreadable samples, read errors]."""
    decode = functools.partial(shards.decode_keeping, transform=opened.preprocess, keep=())
    stream = shards.ShardStream(urls, [shards.shard_name(u) for u in urls], mine, {}, decode, cfg.batch_size)
    gen = decoding.generator(env.dp_rank, env.device)

    def process(good):
        return opened.caption(torch.stack([x["pixels"] for x in good]), decoding, gen)

    counts, start = [0, 0, 0, 0], time.time()
    writer = env.mp_rank == 0
    with tqdm(desc="captioning shards", unit="img", disable=not env.is_main, dynamic_ncols=True, file=sys.stderr) as bar:
        for s, good, bad, errors in shards.per_shard(shards.chunk_loader(stream, cfg.num_workers), cfg.batch_size,
                                                     process):
            # A shard that could not be read to its end gets no results file: a rerun retries it.
            if writer and not errors:
                write_shard_results(paths[s], [{"key": x["key"], "caption": c} for x, c in good], cfg.out_format)
            counts = [counts[0] + 1, counts[1] + len(good), counts[2] + len(bad), counts[3] + bool(errors)]
            bar.update(len(good) + len(bad))
            bar.set_postfix(shards=f"{counts[0]}/{len(mine)}")
            if writer:
                rate = counts[1] / max(time.time() - start, 1e-9)
                print(f"[dp {env.dp_rank}] {os.path.basename(paths[s])}: {len(good)} caption(s), {len(bad)} skipped"
                      + (f", read error: {errors[0]} (no results file: a rerun retries this shard)" if errors else "")
                      + f"; {counts[0]}/{len(mine)} shard(s), {counts[1]} image(s), {rate:.1f} images/s",
                      file=sys.stderr, flush=True)
    return counts
