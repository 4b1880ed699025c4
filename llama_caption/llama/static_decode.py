"""Decoding in fixed shapes: a static KV cache and a decode step that can run as one captured graph.

generation.generate's cache grows a slot per step, so each step has new shapes and launches its
kernels one by one; at batch 1 on a GPU the launches, not the weight reads, set the pace. Here:

- the batch is padded to one of a few sizes (`sizes`; copies of the first prompt fill the rows);
- the KV cache holds the whole window (prompt + max_gen_len, up to the model's max_seq_len) for
  the whole generation, and a step attends over all of it with a mask of the slots it may see;
- the step reads its inputs (token, slot, rotary positions, mask) from buffers of fixed shape,
  so the same computation serves every step: eagerly (`eager`, the reference), compiled with
  torch.compile (`compile`, CPU or CUDA), or captured once per size as a CUDA graph and replayed
  (`cuda_graph`: no per-kernel launch cost).

The prompt is prefilled eagerly into the same cache. Greedy and top-p sampling only (beam search
keeps generation.beam_search). In fp32 on the CPU every mode gives generation.generate's tokens
(tests); the CUDA-graph mode needs a GPU and is off unless asked for.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .generation import build_inputs, cut_at_eos, pick_next
from .model import Transformer, rope_frequencies

MODES = ("eager", "static", "compile", "cuda_graph")  # eager: generation.generate itself
DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class StaticStep:
    """The fixed-shape buffers of one (batch size, window) and the step that reads them."""

    model: Transformer
    batch: int
    window: int
    mode: str
    cache: list = field(init=False, repr=False)

    def __post_init__(self):
        dev = self.model.device
        self.cache = self.model.new_cache(self.batch, self.window)
        self.tokens = torch.zeros(self.batch, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.batch, dtype=torch.long, device=dev)
        self.key_mask = torch.zeros(self.batch, 1, 1, self.window, dtype=torch.bool, device=dev)
        self.graph, self.out = None, None
        self.fn = self.model.decode_static
        if self.mode == "compile":
            self.fn = torch.compile(self.model.decode_static, dynamic=False)

    def run(self) -> torch.Tensor:
        if self.mode == "cuda_graph":
            if self.graph is None:
                self.capture()
            self.graph.replay()
            return self.out
        return self.fn(self.tokens, self.slot, self.positions, self.key_mask, self.cache)

    def capture(self) -> None:
        """Capture the step as a CUDA graph (after warm-up runs on a side stream, as
        torch.cuda.graphs asks). The cache and input buffers are the graph's own: `run` only
        replays it. Warm-up writes into the cache, so capture before a prefill fills it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(self.tokens, self.slot, self.positions, self.key_mask, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.fn(self.tokens, self.slot, self.positions, self.key_mask, self.cache)


class StaticDecoder:
    """Fixed-shape decoding for one model: one StaticStep per padded batch size, made on first
    use and kept (with a CUDA graph, captured once)."""

    def __init__(self, model: Transformer, mode: str = "static", sizes: Sequence[int] = DEFAULT_SIZES,
                 window: Optional[int] = None):
        if mode not in MODES[1:]:
            raise ValueError(f"mode must be one of {MODES[1:]}, got {mode!r}")
        if mode == "cuda_graph" and model.device.type != "cuda":
            raise ValueError("the cuda_graph decoder needs the model on a CUDA device")
        self.model, self.mode, self.sizes = model, mode, tuple(sorted(sizes))
        self.window = window or model.args.max_seq_len
        self.steps: Dict[int, StaticStep] = {}
        model.rope_freqs = rope_frequencies(model.args, model.device)  # before any capture or compile

    def padded_size(self, n: int) -> int:
        return next((s for s in self.sizes if s >= n), n)  # beyond the largest: its own size

    def step_for(self, batch: int) -> StaticStep:
        if batch not in self.steps:
            self.steps[batch] = StaticStep(self.model, batch, self.window, self.mode)
            if self.mode == "cuda_graph":
                self.steps[batch].capture()
        return self.steps[batch]

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], *, eos_id: Union[int, Sequence[int]], max_gen_len: int,
                 prefix: Optional[torch.Tensor] = None, temperature: float = 0.0, top_p: float = 0.95,
                 generator: Optional[torch.Generator] = None) -> List[List[int]]:
        """generation.generate's contract and tokens, in fixed shapes."""
        n = len(prompts)
        size = self.padded_size(n)
        rows = prompts + [prompts[0]] * (size - n)
        if prefix is not None and size > n:
            prefix = torch.cat([prefix, prefix[:1].expand(size - n, *prefix.shape[1:])])
        emb, valid = build_inputs(self.model, rows, prefix)
        width = emb.shape[1]
        if width + max_gen_len > self.window:
            raise ValueError(f"prompt ({width}) + max_gen_len ({max_gen_len}) exceeds the decoder's window {self.window}")
        step = self.step_for(size)
        key_valid, padded = self.key_valid(valid, width)
        logits = self.model(embeddings=emb, cache=step.cache, start_pos=0, key_valid=key_valid if padded else None,
                            last_only=True)[:, -1]
        stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=emb.device)
        out = torch.zeros(n, max_gen_len, dtype=torch.long, device=emb.device)
        done = torch.zeros(n, dtype=torch.bool, device=emb.device)
        n_valid = valid.sum(1)
        slots = torch.arange(self.window, device=emb.device)
        taken = 0
        for i in range(max_gen_len):
            tok = torch.where(done, stops[0], pick_next(logits[:n], temperature, top_p, generator))
            out[:, i] = tok
            taken = i + 1
            done |= torch.isin(tok, stops)
            if i + 1 == max_gen_len or (i % 4 == 3 and bool(done.all())):
                break
            step.tokens[:n] = tok
            step.tokens[n:] = tok[0]
            step.slot.fill_(width + i)
            step.positions.copy_(n_valid + i)
            step.key_mask.copy_((key_valid & (slots <= width + i))[:, None, None, :])
            logits = step.run()
        return [cut_at_eos(r, eos_id) for r in out[:, :taken].tolist()]

    def key_valid(self, valid: torch.Tensor, width: int) -> Tuple[torch.Tensor, bool]:
        """(B, window) True for the prompt's real slots and every generated slot; and whether
        any prompt slot is padding."""
        rest = torch.ones(valid.shape[0], self.window - width, dtype=torch.bool, device=valid.device)
        return torch.cat([valid, rest], 1), not bool(valid.all())


def make_decoder(model: Transformer, mode: str, batch_size: int) -> Optional[StaticDecoder]:
    """The decoder of `mode` for batches of up to `batch_size` (padded to 1, 2, 4 ... 64 or
    `batch_size`); None for `eager`, which is generation.generate itself."""
    if mode == "eager":
        return None
    return StaticDecoder(model, mode, sorted({s for s in DEFAULT_SIZES if s < batch_size} | {batch_size}))
