"""Dynamic batching: the images of concurrent requests are captioned together.

Requests enter a queue (`Batcher.submit`); the decoding loop (`Batcher.next_batch`) takes the
oldest request and every queued one that can share its batch (the same decoding settings, and a
captioner whose prefixes are as long: captioners over one LLaMA differ only in their prefixes,
so one batch holds images of several), up to `max_batch` images. It waits for the batch to fill only while other requests are still being
read and checked (`arriving`: they are about to join), and at most `max_wait_s` after the oldest
one arrived: a lone request starts at once, so batching costs a single user nothing. A request whose settings cannot share goes to a batch of its own: greedy and beam requests
share when their settings are equal; a sampled request is always alone, so that its seed alone
decides its captions. The loop is the only thread that runs the model; under model parallelism
every rank runs each batch (`BatchRunner`: rank 0 broadcasts it first).
"""

import itertools
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..llama.decoding import Decoding
from ..rerank import BestOf, Rankers


class QueueFull(Exception):
    """More images are waiting than --max_queue allows."""


class Closed(Exception):
    """The server is shutting down and takes no new requests."""


def share_key(decoding: Decoding, unique: int):
    """Requests with equal keys are decoded in one batch: greedy and beam requests whose captions
    depend on the same settings (what results files record of them); a sampled one alone, with
    its own generator seeded by its seed."""
    if decoding.sampling:
        return ("sampled", unique)
    return ("beam" if decoding.num_beams > 1 else "greedy",) + tuple(decoding.provenance().items())


_ids = itertools.count()


@dataclass
class QueuedRequest:
    """One request waiting for its batch: its preprocessed images, settings, and the future its
    captions go to."""

    pixels: torch.Tensor  # (n, 3, H, W), as its captioner's encoder takes them
    decoding: Decoding
    captioner: str = ""  # its name among the served captioners ("" with one)
    prefix_len: int = 0  # its captioner's prefix length: a batch's prefixes are of one length
    best_of: BestOf = field(default_factory=BestOf)  # n candidates per image and the rule that picks one
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def n(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def key(self):
        if self.best_of.active:  # alone: its images' candidates are keyed by their place in it
            return ("best_of", self.id)
        return share_key(self.decoding, self.id) + (self.prefix_len,)


class Batcher:
    def __init__(self, max_batch: int, max_wait_s: float, max_queue: int, on_depth: Optional[Callable] = None):
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.queue: List[QueuedRequest] = []
        self.cond = threading.Condition()
        self.closed = False
        self.arriving = 0  # requests being read and checked, not yet submitted
        self.on_depth = on_depth or (lambda images: None)

    def arrive(self) -> None:
        """A request is being read: the next batch may wait (up to max_wait_s) for it."""
        with self.cond:
            self.arriving += 1

    def arrived(self) -> None:
        """That request was submitted, or refused."""
        with self.cond:
            self.arriving -= 1
            self.cond.notify_all()

    def depth(self) -> int:
        """Images waiting."""
        return sum(j.n for j in self.queue)

    def submit(self, job: QueuedRequest, was_arriving: bool = False) -> Future:
        """Queue a request (`was_arriving`: it had called `arrive`, which this ends, refused or not)."""
        with self.cond:
            if was_arriving:
                self.arriving -= 1
                self.cond.notify_all()
            if self.closed:
                raise Closed()
            if self.depth() + job.n > self.max_queue:
                raise QueueFull()
            self.queue.append(job)
            self.on_depth(self.depth())
            self.cond.notify_all()
        return job.future

    def close(self) -> None:
        """Take no new requests; those queued are still captioned."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _compatible(self, key) -> List[QueuedRequest]:
        """The queued jobs that share `key`, oldest first, as many as fit in one batch."""
        out, n = [], 0
        for j in self.queue:
            if j.key == key and n + j.n <= self.max_batch:
                out.append(j)
                n += j.n
        return out

    def take(self, images: int, accept: Callable[[QueuedRequest], bool]) -> List[QueuedRequest]:
        """Without waiting: the oldest requests, in order, while `accept` takes them and their
        images fit in `images` (the first one always, when `images` > 0)."""
        with self.cond:
            out, n = [], 0
            while self.queue and accept(self.queue[0]) and (not out or n + self.queue[0].n <= images) and images > 0:
                job = self.queue.pop(0)
                out.append(job)
                n += job.n
            if out:
                self.on_depth(self.depth())
            return out

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a request; whether one is queued."""
        with self.cond:
            return bool(self.queue) or self.cond.wait_for(lambda: self.queue, timeout)

    def next_batch(self, timeout: float) -> Optional[List[QueuedRequest]]:
        """The next batch, or None when nothing arrived within `timeout` seconds."""
        with self.cond:
            if not self.queue and not self.cond.wait_for(lambda: self.queue, timeout):
                return None
            first = self.queue[0]
            deadline = first.enqueued + self.max_wait_s
            while True:
                jobs = self._compatible(first.key)
                full = sum(j.n for j in jobs) >= self.max_batch or first.key[0] in ("sampled", "best_of")
                left = deadline - time.monotonic()
                if full or left <= 0 or self.closed or not self.arriving:
                    break
                self.cond.wait(left)
            taken = {j.id for j in jobs}
            self.queue = [j for j in self.queue if j.id not in taken]
            self.on_depth(self.depth())
            return jobs


class BatchRunner:
    """Captions batches on every rank of a model-parallel group.

    Rank 0 calls `run(parts, decoding)` (each captioner's name with its images); the other ranks
    sit in `follow()`, which receives each batch (or a keep-alive, or the stop) by broadcast and
    runs it too. Every rank does the same collectives in the same order, which model
    parallelism needs.
    """

    KEEPALIVE_S = 60.0  # idle ranks wait in a collective, which would time out after gloo's 30 min

    def __init__(self, captioners: Dict[str, "OpenedCaptioner"], world: int):  # noqa: F821 (opening.py's)
        self.captioners, self.world = captioners, world
        self.opened = next(iter(captioners.values()))  # the first: the LLaMA, decoder and tokenizer all share
        self.captioner = self.opened.captioner
        # Each captioner's CLIP for CLIP-S, at its first best-of request (tried once).
        self.rankers = Rankers(self.captioner.llama.device, "rerank clip")

    def _broadcast(self, message):
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def _caption(self, parts: List[Tuple[str, torch.Tensor]], d: Decoding, best_of: BestOf = BestOf()) -> list:
        from ..opening import caption_parts
        from ..rerank import choose

        if best_of.active:  # one request (batched alone): its images keyed 0, 1, ... as the Python API keys them
            name, pixels = parts[0]
            op = self.captioners[name]
            # rerank clip needs the CLIP; the other rules take its CLIP-S for the candidates when it can rank.
            ranker = self.rankers.get(name, op, required=best_of.rule == "clip")
            return choose(op, pixels, list(range(len(pixels))), d, best_of, ranker)
        # One server is one data-parallel rank: rank 0's generator, as `caption` on one process.
        return caption_parts([(self.captioners[name], pixels) for name, pixels in parts], d,
                             d.generator(0, self.captioner.llama.device))

    def run(self, parts: List[Tuple[str, torch.Tensor]], d: Decoding, best_of: BestOf = BestOf()) -> list:
        """opening.Captioned of each image of `parts`, in order (with `best_of` active, a
        rerank.Choice each)."""
        if self.world > 1:
            self._broadcast(("batch", parts, d, best_of))
        return self._caption(parts, d, best_of)

    def keepalive(self) -> None:
        if self.world > 1:
            self._broadcast(("keepalive",))

    def stop(self) -> None:
        if self.world > 1:
            self._broadcast(("stop",))

    def follow(self) -> None:
        """The other ranks: run what rank 0 broadcasts until it says stop."""
        while True:
            message = self._broadcast(None)
            if message[0] == "stop":
                return
            if message[0] == "batch":
                try:
                    self._caption(*message[1:])
                except Exception:  # rank 0 meets the same error and answers the request with it
                    pass


def by_captioner(jobs: List[QueuedRequest]) -> Tuple[List[QueuedRequest], List[Tuple[str, torch.Tensor]]]:
    """The jobs in the order their images are decoded (grouped by captioner, each group encoded
    together), and the (captioner, images) parts of that batch."""
    names = list(dict.fromkeys(j.captioner for j in jobs))
    ordered = [j for name in names for j in jobs if j.captioner == name]
    return ordered, [(name, torch.cat([j.pixels for j in jobs if j.captioner == name])) for name in names]


def settle(future: Future, result=None, error: Optional[BaseException] = None) -> None:
    """Answer a request's future, unless its client went away and it was cancelled meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def serve_batches(batcher: Batcher, runner: BatchRunner, finished: Callable[[], bool], metrics=None,
                  log=print) -> None:
    """The decoding loop (rank 0, main thread): until `finished()` and the queue is empty."""
    idle_since = time.monotonic()
    while True:
        jobs = batcher.next_batch(timeout=0.1)
        if not jobs:
            if finished() and not batcher.queue:
                return
            if time.monotonic() - idle_since > runner.KEEPALIVE_S:
                runner.keepalive()
                idle_since = time.monotonic()
            continue
        live = [j for j in jobs if not j.future.cancelled()]
        if not live:
            continue
        run_batch(live, runner, metrics, log)
        idle_since = time.monotonic()


def run_batch(live: List[QueuedRequest], runner: BatchRunner, metrics, log) -> None:
    """Caption one batch of requests and answer each (or each with the error, and go on serving)."""
    live, parts = by_captioner(live)
    n = sum(j.n for j in live)
    start = time.monotonic()
    try:
        captions = runner.run(parts, live[0].decoding, live[0].best_of)
        if live[0].best_of.active:  # rerank.Choice: the chosen caption, and the candidates for who asks
            choices, captions = captions, [c.best for c in captions]
    except Exception as e:
        log(f"error: a batch of {n} image(s) failed: {type(e).__name__}: {e}")
        for j in live:
            settle(j.future, error=e)
        return
    seconds = time.monotonic() - start
    if metrics is not None:
        metrics.batch(n)
    offset = 0
    for j in live:
        if metrics is not None:
            metrics.captioned(j.captioner, j.n)
        mine = captions[offset:offset + j.n]
        answer = {"captions": [c.text for c in mine], "tokens": [len(c.tokens) for c in mine],
                  "ended": [c.ended for c in mine], "decode_s": seconds, "batch_images": n, "queue_s": start - j.enqueued}
        if j.best_of.active:
            answer["candidates"] = [[x.record() for x in c.candidates] for c in choices[offset:offset + j.n]]
        settle(j.future, answer)
        offset += j.n


@dataclass
class InSlots:
    """A request whose images are in the continuous decoder: their captions as they end."""

    job: QueuedRequest
    started: float
    captions: List[Optional[str]]
    tokens: List[int]
    left: int
    busy: int = 0  # the most slots busy while its images were decoded


def greedy(job: QueuedRequest) -> bool:
    return job.key[0] == "greedy"


def serve_continuous(batcher: Batcher, runner: BatchRunner, finished: Callable[[], bool], metrics=None,
                     log=print) -> None:
    """The decoding loop with continuous batching (rank 0 of a one-process server): a greedy
    request's images take free slots at the next step, and it is answered when its last caption
    ends. Sampled and beam requests keep the batch path (a sampled one alone, as `caption` draws
    it), run when the slots have emptied; while one waits at the head of the queue, no greedy
    request behind it takes a slot, so it waits at most for the captions in the slots."""
    decoder = runner.captioner.decoder
    slots: Dict[int, InSlots] = {}
    while True:
        if not decoder.in_flight:
            if not batcher.wait(0.1):
                if finished():
                    return
                continue
            if not greedy(batcher.queue[0]):  # its batch, now that the slots are empty
                serve_one_batch(batcher, runner, metrics, log)
                continue
        jobs = [j for j in batcher.take(decoder.free - len(decoder.waiting), greedy) if not j.future.cancelled()]
        try:
            if jobs:
                admit(runner, decoder, jobs, slots)
            ended = decoder.step()
        except Exception as e:  # every request in the slots is answered with it; the decoder starts empty
            log(f"error: decoding {len(slots)} request(s) failed: {type(e).__name__}: {e}")
            for state in slots.values():
                settle(state.job.future, error=e)
            slots.clear()
            decoder.reset()
            continue
        busy = decoder.slots - decoder.free + len(ended)  # slots that decoded a token in this step
        if metrics is not None:
            metrics.step(busy, decoder.slots - decoder.free)
        for state in slots.values():
            state.busy = max(state.busy, busy)
        answer_ended(ended, slots, runner, metrics)


def answer_ended(ended: list, slots: Dict[int, InSlots], runner: BatchRunner, metrics) -> None:
    """Record the captions that ended in a step; answer each request whose last caption ended."""
    for (job_id, i), tokens in ended:
        state = slots[job_id]
        cap = runner.captioners[state.job.captioner].captioner
        state.captions[i] = cap.tokenizer.decode(tokens).strip()
        state.tokens[i] = len(tokens)
        state.left -= 1
        if state.left:
            continue
        del slots[job_id]
        now = time.monotonic()
        if metrics is not None:
            metrics.images.inc(state.job.n)
            metrics.captioned(state.job.captioner, state.job.n)
        limit = cap.longest(state.job.decoding)
        settle(state.job.future, {"captions": state.captions, "tokens": state.tokens,
                                  "ended": [t < limit for t in state.tokens], "decode_s": now - state.started,
                                  "batch_images": state.busy, "queue_s": state.started - state.job.enqueued})


def admit(runner: BatchRunner, decoder, jobs: List[QueuedRequest], slots: Dict) -> None:
    """The requests' images encoded (each captioner's together) and queued in the decoder, one
    request per image; captioners of any prefix length share the slots."""
    from ..llama.continuous import Request

    jobs, parts = by_captioner(jobs)
    with torch.no_grad():  # one (P, dim) prefix per image, in the jobs' order
        prefixes = [row for name, pixels in parts
                    for row in runner.captioners[name].captioner.prefix(runner.captioners[name].encoder(pixels))]
    start, row = time.monotonic(), 0
    for job in jobs:
        cap = runner.captioners[job.captioner].captioner
        max_gen_len = cap.longest(job.decoding)
        slots[job.id] = InSlots(job, start, [None] * job.n, [0] * job.n, job.n)
        for i in range(job.n):
            decoder.submit(Request(prefixes[row], [cap.tokenizer.bos_id], max_gen_len, tag=(job.id, i)))
            row += 1


def serve_one_batch(batcher: Batcher, runner: BatchRunner, metrics, log) -> None:
    """The next batch of requests that cannot take slots (sampled, beams), as serve_batches runs it."""
    jobs = batcher.next_batch(timeout=0)
    live = [j for j in jobs or [] if not j.future.cancelled()]
    if live:
        run_batch(live, runner, metrics, log)
