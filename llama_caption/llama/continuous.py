"""Continuous batching: a fixed number of decoding slots, each refilled as soon as its caption ends.

StaticDecoder.generate decodes a batch until its longest caption ends, and the rows that ended
early are computed for nothing. Here one KV cache holds `slots` rows, one request each:

- a step feeds every busy slot's last token at that slot's own window position, with its own
  rotary position and key mask (`Transformer.decode_slots`);
- a slot whose caption ended (an end token, or its max_gen_len) takes the next waiting request
  at once: the request's prompt (its prefix embeddings, then its prompt tokens) is prefilled into
  that slot's cache row in the same forward as the other slots' tokens, so admitting a request
  costs no extra pass over the weights, and the other slots keep their state;
- a step's shapes depend only on the number of slots, the window and the prompts it admits
  (their count padded to one of `prefill_sizes`, the padding prompts writing into a spare cache
  row; their length), so it runs through torch.compile (`compile`) or as a CUDA graph captured
  once per shape and replayed (`cuda_graph`), as static_decode.StaticStep does;
- `static` runs the same step with eager kernels, which take any shape: there it runs over the
  busy slots only, moved down to the lowest rows when the waiting line is empty (a CPU's
  products cost by the row: the last captions of a run, or a server's light load, cost less).

A step admits prompts of one length (the waiting line's first request and those right behind it
with as long a prompt), so no prompt is padded and a slot's positions are its window's slots. An
image captioner's prompts (P prefix embeddings + BOS) all have one length.

Each caption is generation.generate's for its request alone: greedy, or top-p sampling with one
draw per token from the request's own generator, whoever shares the slots (tests, fp32 on the CPU).
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .generation import cut_at_eos, pick_next
from .model import Transformer, rope_frequencies

MODES = ("static", "compile", "cuda_graph")
Caption = Tuple[Any, List[int]]  # a request's tag and its tokens, without the end token
_END = object()


@dataclass
class Request:
    """One caption (or completion) to write."""

    prefix: Optional[torch.Tensor]  # (P, dim) embeddings before the prompt (the image's), or None
    prompt: List[int]  # token ids after the prefix, BOS included by the caller
    max_gen_len: int
    temperature: float = 0.0  # 0: greedy; above 0: top-p sampling
    top_p: float = 0.95
    generator: Optional[torch.Generator] = None  # sampling draws from it alone (on the model's device)
    tag: Any = None  # given back with the caption

    @property
    def length(self) -> int:
        """The window slots its prompt takes: prefix and prompt tokens."""
        return (0 if self.prefix is None else self.prefix.shape[0]) + len(self.prompt)


@dataclass
class Live:
    """A request in its slot and the tokens it has so far."""

    request: Request
    out: List[int] = field(default_factory=list)

    @property
    def at(self) -> int:
        """The window slot of the token the next step feeds (the last one generated)."""
        return self.request.length + len(self.out) - 1


class ContinuousDecoder:
    """`slots` requests decoded together; a slot takes the next waiting request as soon as its
    caption ends. `submit` queues a request and `step` runs one forward, returning the captions
    that ended (a server feeds it between steps); `run` does both over an iterable.

    A free slot, and one whose request was admitted in this step (its first token comes from its
    prompt's logits), feeds token 0 at the window's last slot, which no request reaches: a request
    fits when prompt + max_gen_len <= window, and its last fed token sits at prompt + max_gen_len - 2.
    """

    def __init__(self, model: Transformer, slots: int, *, eos_id: Union[int, Sequence[int]], mode: str = "static",
                 window: Optional[int] = None, prefill_sizes: Optional[Sequence[int]] = None):
        check_setup(model, slots, mode, window)
        self.model, self.slots, self.mode = model, slots, mode
        self.window = window or model.args.max_seq_len
        self.eos_id = eos_id
        self.stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
        self.prefill_sizes = admission_sizes(slots, mode, prefill_sizes)
        dev = model.device
        self.cache = model.new_cache(slots + 1, self.window)  # row `slots`: where padding prompts write
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.at = torch.full((slots,), self.window - 1, dtype=torch.long, device=dev)
        self.live: List[Optional[Live]] = [None] * slots
        self.waiting: Deque[Request] = deque()
        self.prompt_buffers: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphs: Dict[Tuple[int, int, int], Tuple[Any, torch.Tensor]] = {}
        self.fn = model.decode_slots
        if mode == "compile":
            self.fn = torch.compile(model.decode_slots, dynamic=False)
        model.rope_freqs = rope_frequencies(model.args, dev)  # before any capture or compile

    @property
    def in_flight(self) -> int:
        """Requests in a slot or waiting for one."""
        return len(self.waiting) + sum(live is not None for live in self.live)

    @property
    def free(self) -> int:
        return sum(live is None for live in self.live)

    def reset(self) -> None:
        """Drop every request, in a slot or waiting (after a failed step: the slots start empty)."""
        self.live = [None] * self.slots
        self.waiting.clear()

    def submit(self, request: Request) -> None:
        """Queue a request; ValueError when it cannot be decoded (nothing queued, slots untouched)."""
        self.check(request)
        self.waiting.append(request)

    def check(self, r: Request) -> None:
        dim = self.model.args.dim
        if r.prefix is not None and (r.prefix.dim() != 2 or r.prefix.shape[1] != dim):
            raise ValueError(f"a request's prefix must be (P, {dim}) embeddings, got shape {tuple(r.prefix.shape)}")
        if r.length == 0:
            raise ValueError("a request needs a prefix or at least one prompt token")
        if isinstance(r.max_gen_len, bool) or not isinstance(r.max_gen_len, int) or r.max_gen_len < 1:
            raise ValueError(f"a request's max_gen_len must be a whole number of at least 1, got {r.max_gen_len!r}")
        if r.length + r.max_gen_len > self.window:
            raise ValueError(f"prompt ({r.length}) + max_gen_len ({r.max_gen_len}) exceeds the decoder's window {self.window}")

    def run(self, requests: Iterable[Request]) -> Iterator[Caption]:
        """Decode `requests`, taking the next from the iterable only when a slot is free for it;
        yields (tag, tokens) for each caption as soon as it ends, so not in the order given. A
        request that cannot be decoded raises ValueError from here; the others stay in their slots."""
        source = iter(requests)
        more = True
        while True:
            while more and len(self.waiting) < self.free:
                request = next(source, _END)
                more = request is not _END
                if more:
                    self.submit(request)
            if not self.in_flight:
                return
            yield from self.step()

    @torch.no_grad()
    def step(self) -> List[Caption]:
        """One forward: the next token of each busy slot and the first of each request admitted
        into a free slot. Returns (tag, tokens) of the captions that ended, each cut before its
        end token as generation.cut_at_eos does."""
        admitted = self.admit()
        if self.mode == "static":
            self.compact()
        feeding = [s for s, live in enumerate(self.live) if live is not None and live.out]
        if not admitted and not feeding:
            return []
        # `static` runs over the rows up to the last busy one (eager kernels take any shape, and a
        # CPU's products cost by the row); the fixed-shape modes over all slots.
        n = 1 + max(feeding + admitted) if self.mode == "static" else self.slots
        tokens, at = [0] * n, [self.window - 1] * n
        for s in feeding:
            tokens[s], at[s] = self.live[s].out[-1], self.live[s].at
        self.tokens[:n].copy_(torch.tensor(tokens))
        self.at[:n].copy_(torch.tensor(at))
        logits = self.forward(admitted, n)
        rows = [(s, s) for s in feeding] + [(s, n + j) for j, s in enumerate(admitted)]
        ended = []
        for (s, _), tok in zip(rows, self.pick(logits, [(row, self.live[s].request) for s, row in rows])):
            live = self.live[s]
            live.out.append(tok)
            if tok in self.stops or len(live.out) == live.request.max_gen_len:
                ended.append((live.request.tag, cut_at_eos(live.out, self.eos_id)))
                self.live[s] = None
        return ended

    def admit(self) -> List[int]:
        """Move waiting requests into free slots: the line's first and those right behind it with
        a prompt as long, as many as there are free slots (at most the largest prefill size).
        Returns their slots."""
        free = [s for s, live in enumerate(self.live) if live is None]
        most = min(len(free), self.prefill_sizes[-1])
        taken: List[Request] = []
        while self.waiting and len(taken) < most and (not taken or self.waiting[0].length == taken[0].length):
            taken.append(self.waiting.popleft())
        for s, request in zip(free, taken):
            self.live[s] = Live(request)
        return free[:len(taken)]

    def compact(self) -> None:
        """Move the requests of the highest busy slots, cache rows and all, into the free slots
        below them, so that a step runs over no more rows than there are requests. (Free slots
        below a busy one remain only when no request is waiting; the requests just admitted took
        the lowest free slots, so only those with cache rows move.)"""
        free = [s for s, live in enumerate(self.live) if live is None]
        busy = [s for s, live in enumerate(self.live) if live is not None]
        moves = []
        while free and busy and free[0] < busy[-1]:
            moves.append((free.pop(0), busy.pop()))
        if not moves:
            return
        dst, src = (torch.tensor(x, device=self.model.device) for x in zip(*moves))
        for layer in self.cache:
            layer.k[dst] = layer.k[src]
            layer.v[dst] = layer.v[src]
        for d, s in moves:
            self.live[d], self.live[s] = self.live[s], None

    def forward(self, admitted: List[int], n: int) -> torch.Tensor:
        """The step's logits (n slot rows + padded admitted count, vocab), through its shape's variant."""
        if not admitted:
            return self.run_variant((n, 0, 0), ())
        requests = [self.live[s].request for s in admitted]
        size = next(k for k in self.prefill_sizes if k >= len(admitted))
        prompts, rows = self.buffers(size, requests[0].length)
        prompts[:len(admitted)] = torch.stack([self.embed(r) for r in requests])
        rows.copy_(torch.tensor(admitted + [self.slots] * (size - len(admitted))))
        return self.run_variant((n, size, requests[0].length), (prompts, rows))

    def buffers(self, size: int, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The fixed input buffers of `size` prompts of `length`: embeddings and cache rows."""
        if (size, length) not in self.prompt_buffers:
            dev, dtype = self.model.device, self.model.dtype
            self.prompt_buffers[size, length] = (torch.zeros(size, length, self.model.args.dim, device=dev, dtype=dtype),
                                                 torch.full((size,), self.slots, dtype=torch.long, device=dev))
        return self.prompt_buffers[size, length]

    def embed(self, r: Request) -> torch.Tensor:
        """(L, dim): the prefix, then the prompt tokens' embeddings (generation.build_inputs's values)."""
        parts = [] if r.prefix is None else [r.prefix.to(self.model.device, self.model.dtype)]
        if r.prompt:
            parts.append(self.model.embed(torch.tensor(r.prompt, device=self.model.device)))
        return torch.cat(parts)

    def run_variant(self, key: Tuple[int, int, int], prompts: tuple) -> torch.Tensor:
        """The step of (slot rows, padded admitted count, prompt length) `key`."""
        args = (self.tokens[:key[0]], self.at[:key[0]], self.cache, *prompts)
        if self.mode != "cuda_graph":
            return self.fn(*args)
        if key not in self.graphs:
            self.graphs[key] = capture(self.fn, args)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def pick(self, logits: torch.Tensor, rows: List[Tuple[int, Request]]) -> List[int]:
        """The next token of each (logits row, request): the argmax for greedy requests (of every
        row at once); else a top-p draw from the request's own generator, one row at a time, as
        generation.generate draws for that request alone. One wait for the device."""
        picks = logits.argmax(-1)
        for row, r in rows:
            if r.temperature > 0:
                picks[row] = pick_next(logits[row:row + 1], r.temperature, r.top_p, r.generator)[0]
        picks = picks.tolist()
        return [picks[row] for row, _ in rows]


def check_setup(model: Transformer, slots: int, mode: str, window: Optional[int]) -> None:
    """ValueError, in one sentence, for settings no request could decode with."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a whole number of at least 1, got {slots!r}")
    top = model.args.max_seq_len
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= top):
        raise ValueError(f"window must be a whole number between 2 and the model's max_seq_len {top}, got {window!r}")
    if mode == "cuda_graph" and model.device.type != "cuda":
        raise ValueError("the cuda_graph decoder needs the model on a CUDA device")


def admission_sizes(slots: int, mode: str, sizes: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """The counts a step's admitted prompts are padded to (one step shape each). By default every
    count up to `slots` for `static` (eager: no shape to keep), else powers of two and `slots`."""
    if sizes is None:
        sizes = range(1, slots + 1) if mode == "static" else [2 ** i for i in range(slots.bit_length())] + [slots]
    kept = tuple(sorted({n for n in sizes if 1 <= n <= slots}))
    if not kept:
        raise ValueError(f"prefill_sizes must hold a count between 1 and slots ({slots}), got {list(sizes)!r}")
    return kept


def capture(fn, args: tuple):
    """`fn(*args)` captured as a CUDA graph, after two warm-up runs on a side stream (as
    torch.cuda.graphs asks); returns the graph and its output buffer. The buffers already hold
    this step's inputs: a step writes each cache entry from inputs and entries it does not write,
    so running it again (warm-up, then the replay) gives the same cache and logits."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph, out
