"""webdataset tar shards (img2dataset's output): patterns, who reads which shard, decoding, and
where an interrupted epoch continues.

    cc3m/{00000..00331}.tar      brace lists; several patterns as a list or joined by '::'
    pipe:aws s3 cp s3://b/{0..9}.tar -     URLs (pipe:, http://, ...) go to webdataset as they are

A shard holds KEY.jpg (or png, webp, ...), KEY.txt and KEY.json per sample; img2dataset also writes
SHARD.parquet with one row per URL. Reading is webdataset's (url_opener, tar_file_expander,
group_by_keys), one shard at a time so that every error is charged to its shard: a shard that
cannot be opened or is cut short yields what it holds and is counted; a sample without an image
or a caption, or with an image that does not decode, is skipped and counted.

Samples are numbered within their shard in stored order. A position is the shards finished and,
for the others, how many samples were consumed; a resumed epoch reads only the rest. Shards are
dealt to data-parallel ranks by sample count (largest first, to the least loaded rank), then
round-robin to a rank's DataLoader workers, so no sample is read twice in an epoch.
"""

import hashlib
import io
import json
import math
import os
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from PIL import Image

from .data import IMAGE_EXTENSIONS, collate, open_rgb, usable_caption
from .distributed import gather_objects
from .errors import UserError

IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
FEATURE_KEY = "npy"  # feature shards: KEY.npy (numpy, no pickle)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, UnicodeDecodeError, KeyError,
                 TypeError, json.JSONDecodeError)


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def expand(patterns, flag: str) -> List[str]:
    """Patterns (a string, '::'-joined strings or a list) to shard URLs, in order, via webdataset's
    brace expansion. Local files must exist: a pattern matching nothing, or a missing file, is a
    one-line error naming the flag."""
    from webdataset.shardlists import expand_urls

    if isinstance(patterns, str):
        patterns = [patterns]
    urls = []
    for pattern in patterns:
        got = expand_urls(str(pattern))
        local = [u for u in got if is_local(u)]
        missing = [u for u in local if not os.path.isfile(u)]
        if local and len(missing) == len(local):
            raise UserError(f"{flag} {pattern!r} matches no file (first tried: {missing[0]}): check the path and "
                            f"quote the pattern so that the shell leaves its braces alone")
        if missing:
            raise UserError(f"{flag} {pattern!r}: {len(missing)} of its {len(local)} files do not exist (first: "
                            f"{missing[0]}): fix the pattern, or list the shards that exist")
        urls += got
    if not urls:
        raise UserError(f"{flag} names no shard")
    if len(set(urls)) < len(urls):
        twice = next(u for u in urls if urls.count(u) > 1)
        raise UserError(f"{flag}: shard {twice} is named twice; its samples would be read twice per epoch")
    return urls


def fingerprint(urls: List[str]) -> str:
    """The shard list's identity: URLs in order, and each local file's size."""
    ident = [[u, os.path.getsize(u) if is_local(u) and os.path.isfile(u) else None] for u in urls]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def shard_name(url: str) -> str:
    return os.path.basename(url.rstrip(" -").split()[-1]) if url.startswith("pipe:") else os.path.basename(url)


def read_shard(url: str, errors: list) -> Iterator[dict]:
    """The raw samples of one shard ({'__key__', 'jpg': bytes, ...}), through webdataset; what goes
    wrong is appended to `errors` and the rest of the shard is skipped."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    def handler(exn):
        errors.append(f"{type(exn).__name__}: {str(exn.args[0] if exn.args else exn).split(' @ ')[0][:200]}")
        return True

    yield from group_by_keys(tar_file_expander(url_opener([{"url": url}], handler=handler), handler=handler),
                             handler=handler)


def parquet_count(url: str) -> Optional[int]:
    """Samples in a local shard by img2dataset's SHARD.parquet beside it (rows with status
    success), or None."""
    path = os.path.splitext(url)[0] + ".parquet"
    if not is_local(url) or not os.path.isfile(path):
        return None
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "status" not in schema.names:
            return pq.read_metadata(path).num_rows
        status = pq.read_table(path, columns=["status"]).column("status").to_pylist()
    except Exception:  # an unreadable parquet: count the shard itself
        return None
    return sum(1 for s in status if s == "success")


def count_shard(url: str) -> int:
    """Samples in a shard: img2dataset's parquet when there is one, else a pass over the tar."""
    n = parquet_count(url)
    return n if n is not None else sum(1 for _ in read_shard(url, []))


def assign(counts: List[int], dp_size: int) -> List[List[int]]:
    """Shard indices per data-parallel rank, balanced by samples: the largest shards first, each to
    the least loaded rank (ties: the lower rank); each rank's list in shard order."""
    load, owned = [0] * dp_size, [[] for _ in range(dp_size)]
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        r = min(range(dp_size), key=lambda r: (load[r], r))
        load[r] += counts[i]
        owned[r].append(i)
    return [sorted(o) for o in owned]


def decode(raw: dict, name: str, transform: Optional[Callable], caption_field: Optional[str],
           need_caption: bool) -> dict:
    """A raw sample to {'image_id': 'SHARD/KEY', 'caption', 'pixels' or 'features'}, or
    {'bad': 'SHARD/KEY', 'reason'} (collate counts those)."""
    ident = f"{name}/{raw.get('__key__')}"
    try:
        item = {"image_id": ident}
        caption = sample_caption(raw, caption_field)
        if need_caption and not usable_caption(caption):
            return {"bad": ident, "reason": "no caption" + (f" (json field {caption_field!r})" if caption_field else " (no .txt)")}
        if caption is not None:
            item["caption"] = caption
        if FEATURE_KEY in raw:
            item["features"] = torch.from_numpy(np.load(io.BytesIO(raw[FEATURE_KEY]), allow_pickle=False)).float()
            return item
        image = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
        if image is None:
            return {"bad": ident, "reason": "no image"}
        item["pixels"] = transform(open_rgb(io.BytesIO(image)))
        return item
    except DECODE_ERRORS as e:
        return {"bad": ident, "reason": f"{type(e).__name__}: {e}"}


def decode_keeping(raw: dict, name: str, transform, keep=("txt", "json")) -> dict:
    """decode() for extraction and captioning: no caption needed; the sample's key and the raw
    bytes of `keep` travel with it."""
    item = decode(raw, name, transform, None, need_caption=False)
    item["key"] = raw.get("__key__")
    if "bad" not in item:
        item["keep"] = {k: raw[k] for k in keep if k in raw}
    return item


def per_shard(chunks, batch_size: int, process) -> Iterator[tuple]:
    """Run `process` (good items -> one output each) over a ShardStream's chunks in batches of
    `batch_size`, and yield (shard, [(item, output)], [bad items], [read errors]) once every sample
    of a shard is processed."""
    results, ended, buffer = {}, {}, []

    def flush():
        good = [x for x in buffer if "bad" not in x]
        outputs = process(good) if good else []
        for x, o in zip(good, outputs):
            results[x["shard"]][0].append((x, o))
        for x in buffer:
            if "bad" in x:
                results[x["shard"]][1].append(x)
        buffer.clear()

    def finished():
        waiting = {x["shard"] for x in buffer}
        for s in [s for s in ended if s not in waiting]:
            yield (s, *results.pop(s, ([], [])), ended.pop(s))

    for chunk in chunks:
        for item in unpack(chunk):
            if "end" in item:
                ended[item["end"]] = item["errors"]
                results.setdefault(item["end"], ([], []))
                continue
            results.setdefault(item["shard"], ([], []))
            buffer.append(item)
            if len(buffer) >= batch_size:
                flush()
        yield from finished()
    flush()
    yield from finished()


def per_shard_streamed(chunks, stream) -> Iterator[tuple]:
    """per_shard for a decoder that streams: `stream` takes an iterable of lists of good items
    (read only as it asks) and yields (item, output) as each output is ready, in any order. Yields
    (shard, [(item, output)] in the shard's order, [bad items], [read errors]) once every sample
    of a shard has its output."""
    results, ended, waiting, ready = {}, {}, {}, []

    def finished():
        for s in [s for s in ended if not waiting.get(s)]:
            good, bad = results.pop(s, ([], []))
            ready.append((s, sorted(good, key=lambda pair: pair[0]["index"]), bad, ended.pop(s)))

    def batches():
        for chunk in chunks:
            good = []
            for item in unpack(chunk):
                s = item.get("end", item.get("shard"))
                results.setdefault(s, ([], []))
                if "end" in item:
                    ended[s] = item["errors"]
                elif "bad" in item:
                    results[s][1].append(item)
                else:
                    good.append(item)
                    waiting[s] = waiting.get(s, 0) + 1
            finished()
            if good:
                yield good

    for item, output in stream(batches()):
        results[item["shard"]][0].append((item, output))
        waiting[item["shard"]] -= 1
        finished()
        while ready:
            yield ready.pop(0)
    finished()
    yield from ready


def sample_caption(raw: dict, caption_field: Optional[str]) -> Optional[str]:
    if caption_field:
        if "json" not in raw:
            return None
        value = json.loads(raw["json"].decode("utf-8"))
        return value.get(caption_field) if isinstance(value, dict) else None
    return raw["txt"].decode("utf-8") if "txt" in raw else None


@dataclass
class Position:
    """Where an epoch stands: shards finished, and samples consumed of the others."""

    epoch: int = 0
    done: set = field(default_factory=set)
    partial: Dict[int, int] = field(default_factory=dict)
    # Per data-parallel rank, whose turn it is among its loader workers: [worker, items left in
    # that turn, workers]. With it a resumed epoch makes the micro-batches the whole one makes.
    turns: Dict[int, List[int]] = field(default_factory=dict)

    def to_dict(self, fp: str) -> dict:
        return {"fingerprint": fp, "epoch": self.epoch, "done": sorted(self.done),
                "partial": {str(k): v for k, v in sorted(self.partial.items())},
                "turns": {str(k): v for k, v in sorted(self.turns.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        return cls(d["epoch"], set(d["done"]), {int(k): v for k, v in d["partial"].items()},
                   {int(k): list(v) for k, v in d.get("turns", {}).items()})

    def merge(self, other: "Position") -> None:
        self.turns.update(other.turns)
        self.done |= other.done
        for k, v in other.partial.items():
            self.partial[k] = max(self.partial.get(k, 0), v)
        self.partial = {k: v for k, v in self.partial.items() if k not in self.done}


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's samples in chunks (lists of decoded items, and a {'end': shard} marker after each
    shard; each chunk names its worker, and a worker's last chunk says so). Worker w of W reads
    shards w, w+W, ... of `order`, less those in `skip` (finished before an interruption: each
    worker keeps the shards it had), skipping the first `offsets[s]` samples of shard s. With
    `resample`, each worker draws shards from all of them at random, with replacement, for ever
    (seeded by `seed_text` and the worker)."""

    def __init__(self, urls: List[str], names: List[str], order: List[int], offsets: Dict[int, int], decode_fn,
                 chunk: int, resample: bool = False, seed_text: str = "", skip=frozenset()):
        self.urls, self.names, self.order, self.offsets, self.skip = urls, names, order, offsets, skip
        self.decode_fn, self.chunk, self.resample, self.seed_text = decode_fn, chunk, resample, seed_text

    @staticmethod
    def worker() -> tuple:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def my_shards(self) -> Iterator[int]:
        w, n = self.worker()
        if not self.resample:
            yield from (s for s in self.order[w::n] if s not in self.skip)
            return
        rng = random.Random(f"{self.seed_text}/{w}")
        while True:  # __iter__ stops when many draws in a row found nothing (every shard unreadable)
            yield rng.randrange(len(self.urls))

    def __iter__(self):
        worker = self.worker()[0]
        for chunk in self.chunks():
            chunk["worker"] = worker
            yield chunk
        yield {"items": [], "tensors": {}, "worker": worker, "last": True}

    def chunks(self):
        out, barren = [], 0
        for s in self.my_shards():
            if barren > 3 * len(self.urls) + 8:
                return
            errors, skip, index = [], self.offsets.get(s, 0), -1
            for index, raw in enumerate(read_shard(self.urls[s], errors)):
                if index < skip:
                    continue  # consumed before the interruption: not even decoded
                item = self.decode_fn(raw, self.names[s])
                item.update(shard=s, index=index)
                out.append(item)
                if len(out) >= self.chunk:
                    yield pack(out)
                    out = []
            barren = barren + 1 if index < 0 else 0
            out.append({"end": s, "total": index + 1, "errors": [f"{self.urls[s]}: {e}" for e in errors]})
            yield pack(out)
            out = []


TENSOR_KEYS = ("pixels", "features")


def pack(items: List[dict]) -> dict:
    """A chunk as it crosses from a DataLoader worker: the items' tensors stacked into one per key
    (one shared-memory transfer per chunk rather than per image)."""
    tensors = {}
    for key in TENSOR_KEYS:
        rows = [x.pop(key) for x in items if key in x]
        if rows:
            tensors[key] = torch.stack(rows)
    return {"items": items, "tensors": tensors}


def unpack(chunk: dict) -> List[dict]:
    """The items of a packed chunk, each with its own row of the stacked tensors."""
    rows = {key: iter(t) for key, t in chunk["tensors"].items()}
    for x in chunk["items"]:
        if "bad" not in x and "end" not in x:
            for key, it in rows.items():
                x[key] = next(it)
    return chunk["items"]


def chunk_loader(stream: ShardStream, num_workers: int):
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, collate_fn=lambda x: x)


CHECKPOINT_KEY = "shards"  # where trainer.json keeps the position


def resume_position(saved: Optional[dict], fp: str, dp_size: int, flag: str = "--train_shards") -> Optional[Position]:
    """Where a checkpoint's epoch stood (`ShardTraining.state`; None: nothing recorded, or resampled
    streaming), refused when the shards changed since or the data-parallel size differs."""
    if not saved:
        return None
    if saved.get("fingerprint") != fp:
        raise UserError(f"--resume: {flag} names other shards, or shards that changed, since the checkpoint "
                        f"(fingerprint {saved.get('fingerprint')} -> {fp}): give the shards the run "
                        f"started with, or start a new --out_dir with --init_from")
    if "done" not in saved:
        return None
    if saved.get("dp_size", dp_size) != dp_size:
        raise UserError(f"--resume: the checkpoint's epoch was dealt to {saved['dp_size']} data-parallel ranks, "
                        f"this run has {dp_size}: launch the same number of processes to finish it")
    return Position.from_dict(saved)


class ShardTraining:
    """The training samples of --train_shards: each rank's shards, steps per epoch decided before the
    epoch (every rank takes the same number: a rank whose shards run out takes empty micro-batches
    until the rank with the most samples is done), micro-batches and the epoch's position.

    `counts` (samples per shard) decides the split and the steps; with `samples_per_epoch` shards
    are drawn at random instead, and an epoch is that many samples."""

    dataset = None  # a stream: no image's references to look up (training_data.TrainingData)

    def __init__(self, urls: List[str], names: List[str], counts: Optional[List[int]], fp: str, decode_fn,
                 micro: int, accum: int, dp_size: int, dp_rank: int, seed: int, num_workers: int,
                 samples_per_epoch: Optional[int] = None, log=print, restored: Optional[Position] = None):
        self.urls, self.names, self.counts, self.fingerprint = urls, names, counts, fp
        self.decode_fn, self.micro, self.accum, self.dp_size, self.dp_rank = decode_fn, micro, accum, dp_size, dp_rank
        self.seed, self.num_workers, self.samples_per_epoch, self.log = seed, num_workers, samples_per_epoch, log
        self.owned = assign(counts, dp_size) if counts is not None else None
        self.position = Position()
        self.restored = restored  # where the checkpoint a run resumes from stood (resume_position)
        self.shard_errors: List[str] = []
        self.seen_errors = set()
        self.pending: Dict[int, int] = {}  # shards read to their end: their sample count

    def __len__(self):
        return self.samples_per_epoch or sum(self.counts)

    @property
    def steps_per_epoch(self) -> int:
        if self.samples_per_epoch:
            return self.samples_per_epoch // (self.micro * self.accum * self.dp_size)
        per_rank = [sum(self.counts[i] for i in o) for o in self.owned]
        return max(math.ceil(math.ceil(n / self.micro) / self.accum) for n in per_rank)

    def restore(self, saved: Optional[dict], flag: str = "--train_shards") -> None:
        """The position a checkpoint recorded (`state`); a shard list that changed since is refused."""
        position = resume_position(saved, self.fingerprint, self.dp_size, flag)
        if position is not None:
            self.restored = position

    def batches(self, epoch: int, start_step: int) -> Iterator[dict]:
        """This rank's micro-batches of `epoch`, from where its position stands; empty ones once
        its shards are done."""
        pos = self.restored if self.restored is not None and self.restored.epoch == epoch else Position(epoch)
        self.position, self.pending = Position(epoch, set(pos.done), dict(pos.partial)), {}
        if self.samples_per_epoch:  # a resumed run draws afresh, seeded by where it resumes
            stream = ShardStream(self.urls, self.names, [], {}, self.decode_fn, self.micro, True,
                                 f"{self.seed}/{epoch}/{self.dp_rank}/{start_step}")
        else:
            # The whole epoch's order, then less the shards finished: each worker keeps its shards.
            order = list(self.owned[self.dp_rank])
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            stream = ShardStream(self.urls, self.names, order, pos.partial, self.decode_fn, self.micro,
                                 skip=frozenset(pos.done))
        turn = self.resumed_turn(pos, epoch) if not self.samples_per_epoch else None
        return self.rebatch(iter(chunk_loader(stream, self.num_workers)), turn)

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def resumed_turn(self, pos: "Position", epoch: int) -> Optional[List[int]]:
        """Where the interrupted epoch's turns stood on this rank, when they can be taken up."""
        turn = pos.turns.get(self.dp_rank)
        if turn is None or not (pos.done or pos.partial):
            return None
        if turn[2] != self.workers:
            self.log(f"note: --num_workers {self.num_workers} reads in {self.workers} stream(s), the checkpoint's run "
                     f"in {turn[2]}: "
                     f"epoch {epoch + 1} goes on with each sample used once, but its micro-batches are not those "
                     f"of an uninterrupted run")
            return None
        return turn

    def rebatch(self, chunks, turn: Optional[List[int]] = None) -> Iterator[dict]:
        """Micro-batches in an order that does not depend on timing: the workers take turns, each
        giving `micro` items (fewer when it runs out; the next worker fills the micro-batch). The
        turn is part of the position, so that a resumed epoch goes on exactly where it stopped."""
        queues = [deque() for _ in range(self.workers)]
        last = [False] * self.workers
        worker, left = (turn[0], turn[1]) if turn else (0, self.micro)
        exhausted = False

        def pull() -> None:
            nonlocal exhausted
            chunk = next(chunks, None)
            if chunk is None:
                exhausted = True
                return
            w = chunk["worker"]
            last[w] = last[w] or chunk.get("last", False)
            for item in unpack(chunk):
                if "end" in item:
                    self.shard_ended(item)
                else:
                    queues[w].append(item)

        def finished(w: int) -> bool:
            return not queues[w] and (last[w] or exhausted)

        while True:
            items = []
            while len(items) < self.micro:
                while not queues[worker] and not (last[worker] or exhausted):
                    pull()
                if not queues[worker]:  # this worker is done: the next one's turn
                    if all(finished(w) for w in range(self.workers)):
                        break
                    worker, left = (worker + 1) % self.workers, self.micro
                    continue
                items.append(queues[worker].popleft())
                left -= 1
                if left == 0:
                    worker, left = (worker + 1) % self.workers, self.micro
            for item in items:  # consumed once yielded: a checkpoint comes only after the step
                self.position.partial[item["shard"]] = max(self.position.partial.get(item["shard"], 0),
                                                           item["index"] + 1)
            self.position.turns = {self.dp_rank: [worker, left, self.workers]}
            self.close_shards()
            yield collate(items)

    def shard_ended(self, marker: dict) -> None:
        s = marker["end"]
        self.pending[s] = marker["total"]
        if marker["errors"] and s not in self.seen_errors:  # a resampled shard fails again each time it is drawn
            self.seen_errors.add(s)
            self.shard_errors.append(marker["errors"][0])
            print(f"warning: [dp {self.dp_rank}] skipped the rest of shard {marker['errors'][0]}", file=sys.stderr,
                  flush=True)

    def close_shards(self) -> None:
        """Shards whose every sample is consumed move from partial to done."""
        for s, total in list(self.pending.items()):
            if self.position.partial.get(s, 0) >= total:
                self.position.done.add(s)
                self.position.partial.pop(s, None)
                del self.pending[s]

    @property
    def read_errors(self) -> List[str]:
        return self.shard_errors

    def error_report(self, total: int) -> str:
        return f", {total} shard(s) cut short by read errors"

    def checkpoint_state(self, epochs_done: int) -> dict:
        """trainer.json's record of where the epoch stands, over all ranks (a collective)."""
        return {CHECKPOINT_KEY: self.state(epochs_done, gather_objects)}

    def state(self, epochs_done: int, gather) -> dict:
        """The position over all ranks (`gather`: all_gather_object), for the checkpoint. At an
        epoch's end it is the start of the next."""
        if self.samples_per_epoch:
            return {"fingerprint": self.fingerprint, "resampled": True}
        mine = self.position if self.position.epoch == epochs_done else Position(epochs_done)
        merged = Position(epochs_done)
        for other in gather(mine.to_dict(self.fingerprint)):
            merged.merge(Position.from_dict(other))
        return dict(merged.to_dict(self.fingerprint), dp_size=self.dp_size)
