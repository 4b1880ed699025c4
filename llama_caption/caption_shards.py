"""`caption --shards`: webdataset tar shards captioned into one results file per shard (docs/shards.md).

The shards not yet captioned in --out (by the same settings: OUT/run.json records them) are
dealt out over the data-parallel groups; each group's first model-parallel rank writes a shard's
results, atomically, once its last sample is captioned, then its record, OUT/NAME.shard.json:
which shard it was (path, size and modification time; the URL of a remote one), the samples read,
the captions written, the samples skipped and why, and the read error of a damaged shard (one cut
short: its readable samples are captioned). A rerun takes a shard as done only when its results
file and record are there and the record names this shard; a damaged one is read again only with
--retry_damaged. `cfg` is inference.InferenceConfig.
"""

import functools
import itertools
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

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
RECORD_SUFFIX = ".shard.json"


def held_results(out: str) -> List[str]:
    """The shard results files in --out, of either format (whatever shards they came from)."""
    if not os.path.isdir(out):
        return []
    return sorted(f for f in os.listdir(out) if f.endswith(RESULT_FORMATS) and not f.startswith("."))


def record_path(results: str) -> str:
    """OUT/NAME.shard.json: what the results file OUT/NAME.jsonl was made from."""
    return os.path.splitext(results)[0] + RECORD_SUFFIX


def shard_identity(url: str) -> Dict:
    """What a shard is: a local file's absolute path, size and modification time (a copy or a move
    that keeps them is the same shard); a remote one's URL."""
    if not shards.is_local(url):
        return {"url": url}
    st = os.stat(url)
    return {"path": os.path.abspath(url), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_shard(held: Dict, now: Dict) -> bool:
    if "url" in held or "url" in now:
        return held == now
    return (held.get("size"), held.get("mtime_ns")) == (now["size"], now["mtime_ns"])


def read_record(path: str) -> Optional[Dict]:
    """A shard's record, or None when there is none or it cannot be read (the shard is redone)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) and isinstance(record.get("source"), dict) else None
    except (OSError, ValueError):
        return None


@dataclass
class Claimed:
    """What --out already holds of these shards: the ones done, and what a rerun says of the rest."""

    done: Set[int] = field(default_factory=set)
    damaged: int = 0  # done, recorded as damaged, not retried
    notes: List[str] = field(default_factory=list)


def claim_shard_results(cfg, urls: List[str], paths: List[str], made_by: dict) -> Claimed:
    """The shards already captioned in --out by the same settings, each recognised by its record.
    Results of other settings (another format included) are refused; a known name holding another
    shard's captions is refused; a shard that changed in place, or a results file with no record,
    is captioned again. With --overwrite every shard is done again and the folder's results files
    are removed first (`clear_shard_results`), so that one folder never holds two settings' captions."""
    run_file = os.path.join(cfg.out, "run.json")
    held = held_results(cfg.out)
    claimed = Claimed()
    if cfg.overwrite:
        return claimed
    if os.path.isfile(run_file):
        with open(run_file, encoding="utf-8") as f:
            diff = first_difference(json.load(f), made_by)
        if diff and held:
            raise UserError(f"--out {cfg.out} holds captions made with other settings ({diff}): pick another --out to "
                            f"keep both, or add --overwrite to replace them (every results file in it is removed)")
    elif held:
        raise UserError(f"--out {cfg.out} holds results files but no run.json says what made them: pick another --out, "
                        f"or add --overwrite")
    unrecorded = changed = retried = 0
    for i, (url, path) in enumerate(zip(urls, paths)):
        if not os.path.isfile(path):
            continue
        record = read_record(record_path(path))
        if record is None:
            unrecorded += 1
            continue
        now = shard_identity(url)
        if not same_shard(record["source"], now):
            if record["source"].get("path", record["source"].get("url")) != now.get("path", url):
                raise UserError(f"--out {cfg.out}: {os.path.basename(path)} holds the captions of another shard "
                                f"({record.get('shard')}), not of {url}: caption these shards into another --out, "
                                f"or add --overwrite to replace every results file in it")
            changed += 1
        elif record.get("damaged") and cfg.retry_damaged:
            retried += 1
        else:
            claimed.done.add(i)
            claimed.damaged += bool(record.get("damaged"))
    for n, what in ((unrecorded, "results file(s) with no record of their shard (written before records, or cut "
                                 "off before it): captioned again"),
                    (changed, "shard(s) changed since they were captioned (size or modification time): captioned again"),
                    (retried, "damaged shard(s) read again (--retry_damaged)")):
        if n:
            claimed.notes.append(f"{n} {what}")
    if claimed.damaged:
        claimed.notes.append(f"{claimed.damaged} shard(s) recorded as damaged are not read again (--retry_damaged "
                             f"reads them)")
    return claimed


def clear_shard_results(out: str) -> int:
    """--overwrite: remove the folder's results files and their records (rank 0, before anything
    new is written)."""
    held = held_results(out)
    for name in held:
        os.unlink(os.path.join(out, name))
        if os.path.isfile(record_path(os.path.join(out, name))):
            os.unlink(record_path(os.path.join(out, name)))
    return len(held)


def shard_record(url: str, source: Dict, good: List, bad: List, errors: List[str], fmt: str) -> Dict:
    """NAME.shard.json: the shard it came from and what was read, written and skipped."""
    return {"shard": url, "source": source, "format": fmt, "samples": len(good) + len(bad), "captions": len(good),
            "skipped": [{"key": x.get("key"), "reason": x["reason"]} for x in bad],
            "damaged": errors[0] if errors else None}


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
        claimed = claim_shard_results(cfg, urls, paths, made_by)
        done = claimed.done
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
                f"MP {env.mp_size} x DP {env.dp_size}" + "".join(f"; {n}" for n in claimed.notes))
        sources = {i: shard_identity(urls[i]) for i in todo}  # as they were before reading
        counts = caption_my_shards(cfg, env, opened, decoding, urls, paths, todo[env.dp_rank::env.dp_size], sources)
        totals = torch.tensor(counts, dtype=torch.long, device=env.device)
        dist.all_reduce(totals)
        shards_done, images, bad, errors = (int(t) // env.mp_size for t in totals)
        dist.barrier()  # every record is written
        if env.is_main:
            env.log(f"this run wrote {images} caption(s) for {shards_done} shard(s); " + summary(cfg.out, paths))
        return {"shards": shards_done, "images": images, "bad": bad, "shard_errors": errors}


def summary(out: str, paths: List[str]) -> str:
    """What --out holds for these shards, read from their records (so a rerun that had nothing
    to do counts the same): captions, samples skipped, damaged shards."""
    records = [r for r in (read_record(record_path(p)) for p in paths if os.path.isfile(p)) if r is not None]
    captions, skipped = sum(r.get("captions", 0) for r in records), sum(len(r.get("skipped", [])) for r in records)
    damaged = sum(bool(r.get("damaged")) for r in records)
    line = (f"{out} holds {captions} caption(s) for {len(records)} of the {len(paths)} shard(s); {skipped} "
            f"unreadable sample(s) skipped (each shard's NAME.shard.json names them)")
    if damaged:
        line += (f"; {damaged} shard(s) damaged (cut short by a read error): their readable samples are captioned "
                 f"and they are recorded as damaged, not read again unless --retry_damaged")
    return line


def caption_my_shards(cfg, env, opened: OpenedCaptioner, decoding: Decoding, urls, paths,
                      mine: List[int], sources: Dict[int, Dict]) -> List[int]:
    """This data-parallel group's shards; returns [shards, captions written, unreadable samples,
    damaged shards]."""
    decode = functools.partial(shards.decode_keeping, transform=opened.preprocess, keep=())
    stream = shards.ShardStream(urls, [shards.shard_name(u) for u in urls], mine, {}, decode, cfg.batch_size)
    gen = decoding.generator(env.dp_rank, env.device)

    def process(good):
        return opened.caption(torch.stack([x["pixels"] for x in good]), decoding, gen)

    def streamed(batches):
        """--decoder continuous: each sample's caption as it ends (sampling seeded per sample by
        its shard's name and key)."""
        held, numbers = {}, itertools.count()

        def fed():
            for good in batches:
                tags = [next(numbers) for _ in good]
                held.update(zip(tags, good))
                yield torch.stack([x["pixels"] for x in good]), tags

        seed_key = lambda tag: zlib.crc32(f"{held[tag]['image_id']}".encode())  # noqa: E731
        for tag, caption in opened.stream(fed(), decoding, env.device, seed_key):
            yield held.pop(tag), caption

    chunks = shards.chunk_loader(stream, cfg.num_workers)
    finished = (shards.per_shard_streamed(chunks, streamed) if opened.decoder == "continuous"
                else shards.per_shard(chunks, cfg.batch_size, process))

    counts, start = [0, 0, 0, 0], time.time()
    writer = env.mp_rank == 0
    with tqdm(desc="captioning shards", unit="img", disable=not env.is_main, dynamic_ncols=True, file=sys.stderr) as bar:
        for s, good, bad, errors in finished:
            # A damaged shard (cut short by a read error) keeps what could be read, and says so.
            if writer:
                write_shard_results(paths[s], [{"key": x["key"], "caption": c} for x, c in good], cfg.out_format)
                write_json(record_path(paths[s]), shard_record(urls[s], sources[s], good, bad, errors, cfg.out_format),
                           indent=1)
            counts = [counts[0] + 1, counts[1] + len(good), counts[2] + len(bad), counts[3] + bool(errors)]
            bar.update(len(good) + len(bad))
            bar.set_postfix(shards=f"{counts[0]}/{len(mine)}")
            if writer:
                rate = counts[1] / max(time.time() - start, 1e-9)
                print(f"[dp {env.dp_rank}] {os.path.basename(paths[s])}: {len(good)} caption(s), {len(bad)} skipped"
                      + (f", damaged: {errors[0]} (its readable samples are captioned; --retry_damaged reads it "
                         f"again)" if errors else "")
                      + f"; {counts[0]}/{len(mine)} shard(s), {counts[1]} image(s), {rate:.1f} images/s",
                      file=sys.stderr, flush=True)
    return counts
