"""Throughput and memory benchmarks.

    python -m llama_caption bench                      # CPU-sized model, this machine
    python -m llama_caption bench --config 7b          # LLaMA-7B shape, random weights, on a GPU

1. Decoding (captions/s), the same random-weight model, prefix embeddings and caption length:
   ours (batched greedy with the KV cache), the no-cache baseline (the first version's decoder:
   one image at a time, the whole sequence re-run every step) and Hugging Face transformers'
   LlamaForCausalLM.generate on the same weights converted to its layout, fed the same
   inputs_embeds. The captions of the three are compared token by token.
2. Training steps (samples/s) from the CLIP feature cache against CLIP on the fly, with the
   demo's stand-in models (config cpu).
3. Peak memory of generation and of a training step (CUDA: allocator peak; CPU: process RSS).
4. Ours again with the fixed-shape decoders of static_decode.py (`--decoders`: static, compile,
   cuda_graph), each checked caption by caption against the eager decoder.
5. Instead of 1-4 (`--continuous`): the continuous-batching decoder (continuous.py) against the
   batch decoder (StaticDecoder) at 8, 32 and 64 slots, on captions of COCO-like lengths
   (`caption_lengths`), in each `--decoders` mode; the two decoders' captions are compared.
On a GPU it also prints tokens/s, the weight bandwidth achieved against the card's peak, the
model FLOPs utilisation of a training step, and what these rates mean for captioning val2014 and
for one epoch of COCO train on that card. Writes the figures as JSON (--out).
"""

import functools
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .. import distributed
from ..captioner import Captioner, CaptionerSpec, CaptionStyle
from ..llama.checkpoint import load_llama
from ..config import Config, command, setting
from ..data import CaptionDataset, collate, drop_missing, load_coco
from ..errors import UserError
from ..features import FeatureCache
from ..fileio import check_output_file, write_json
from ..runtime import DTYPE_NAMES, DTYPES
from ..llama.decoding import Decoding, decode
from ..llama.model import ModelArgs, Transformer
from .testing import demo_layout, greedy_no_cache, random_model
from ..vision import OPEN_CLIP, ClipEncoder, EncoderSpec, OpenClipEncoder

CONFIGS = {
    # dim 512 x 8 layers with LLaMA's 32000-word vocabulary: ~60M parameters, CPU-sized.
    "cpu": dict(dim=512, n_layers=8, n_heads=8, vocab=32000, prefix=10, gen_len=20, images=32,
                no_cache_images=4, batches=(1, 8, 32), hf_batches=(1, 32), dtype="fp32", train_batch=32),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab=32000, prefix=10, gen_len=20, images=64,
               no_cache_images=1, batches=(1, 8, 32, 64), hf_batches=(32,), dtype="fp16", train_batch=32),
    # For the tests: seconds on a CPU.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab=512, prefix=4, gen_len=8, images=8,
                 no_cache_images=8, batches=(1, 8), hf_batches=(8,), dtype="fp32", train_batch=8),
}
# The continuous-batching comparison (--continuous): slot counts and how many captions.
CONTINUOUS = {"cpu": dict(slots=(8, 32, 64), requests=512), "7b": dict(slots=(8, 32, 64), requests=2048),
              "tiny": dict(slots=(2, 4), requests=12)}
LONGEST_CAPTION = 30
# Dense bf16/fp16 tensor-core peak (TFLOP/s) and memory bandwidth (GB/s) from the vendors' sheets.
VAL2014_IMAGES, COCO_TRAIN_CAPTIONS = 40504, 414113
PEAKS = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "A100": (312.0, 2039.0)}


def to_hf_state_dict(model: Transformer) -> Dict[str, torch.Tensor]:
    """Meta's layout to transformers' LlamaForCausalLM layout (names, q/k rows per head)."""
    from ..llama.huggingface import to_hf_layout

    return to_hf_layout(model.state_dict(), model.args)


def hf_model(model: Transformer):
    """The same weights in transformers' LlamaForCausalLM (None when transformers is missing)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    a = model.args
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads,
                      rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf.load_state_dict(to_hf_state_dict(model), strict=True, assign=True)
    # Rotary buffers are not in the state dict: rebuild them on the real device.
    with torch.device(model.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    return hf.to(model.dtype).eval()


@torch.no_grad()
def hf_generate(hf, inputs_embeds: torch.Tensor, gen_len: int) -> List[List[int]]:
    out = hf.generate(inputs_embeds=inputs_embeds, attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long,
                      device=inputs_embeds.device), max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False,
                      eos_token_id=None, pad_token_id=0, use_cache=True, temperature=None, top_p=None, top_k=None)
    return out[:, -gen_len:].tolist()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory inside a `with` block: CUDA allocator peak, or process RSS sampled every 2 ms."""

    def __init__(self, device):
        self.device, self.peak, self.base = device, 0, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self.rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def extra_mb(self) -> float:
        """Memory above what was allocated on entry (the weights), in MiB."""
        return (self.peak - self.base) / 2**20


def timed(fn, device, repeat: int = 2, min_seconds: float = 4.0, max_repeat: int = 10):
    """Run once to warm up (allocator, kernels, caches), then keep the fastest of at least
    `repeat` runs, more (up to `max_repeat`) until `min_seconds` have been spent: on a shared
    machine the minimum is the figure least disturbed by other work, and a short run needs
    several tries to find a quiet moment. Returns the fastest run's output and its seconds."""
    fn()
    best, best_out, spent, runs = float("inf"), None, 0.0, 0
    while runs < repeat or (spent < min_seconds and runs < max_repeat):
        out, dt = run_once(fn, device)
        if dt < best:
            best, best_out = dt, out
        spent, runs = spent + dt, runs + 1
    return best_out, best


def run_once(fn, device):
    """fn()'s output and its seconds, the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def timed_in_turns(fns: Dict[str, Callable], device, rounds: int = 3, min_seconds: float = 8.0,
                   max_rounds: int = 10) -> Dict[str, tuple]:
    """`timed` for functions compared with each other: each runs once to warm up, then in rounds
    where each runs once, in turn, for at least `rounds` rounds and `min_seconds` (at most
    `max_rounds`). Gives each one's fastest run as (output, seconds). On a shared machine a busy
    spell then slows the runs of one round, all of them, not one function's whole measurement."""
    for fn in fns.values():
        fn()
    best = {k: (None, float("inf")) for k in fns}
    spent, done = 0.0, 0
    while done < rounds or (spent < min_seconds and done < max_rounds):
        for k, fn in fns.items():
            out, dt = run_once(fn, device)
            if dt < best[k][1]:
                best[k] = (out, dt)
            spent += dt
        done += 1
    return best


def decode_prefixes(model: Transformer, c: dict, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(1)
    return torch.randn(c["images"], c["prefix"], model.args.dim, generator=g, device=device).to(model.dtype)


BOS = 1  # eos_id -1 below: no token ends a caption early, so every decoder makes gen_len tokens


def time_ours(model: Transformer, prefix: torch.Tensor, batch: int, gen_len: int, device, decoder=None):
    """Our decoder over all prefixes at `batch` images a call: (tokens, seconds, peak MiB).
    `decoder`: a static_decode.StaticDecoder, else generation.generate."""
    with PeakMemory(device) as mem:
        toks, dt = timed(decode_run(model, prefix, batch, gen_len, decoder), device)
    return toks, dt, mem.extra_mb


def decode_run(model: Transformer, prefix: torch.Tensor, batch: int, gen_len: int, decoder=None):
    """A function decoding greedy `gen_len`-token captions of all prefixes, `batch` a call."""
    greedy = Decoding(max_gen_len=gen_len)

    def run():
        toks = []
        for s in range(0, len(prefix), batch):
            rows, pre = [[BOS]] * len(prefix[s:s + batch]), prefix[s:s + batch]
            toks += decode(model, rows, greedy, eos_id=-1, prefix=pre, decoder=decoder)
        return toks
    return run


def time_no_cache(model: Transformer, prefix: torch.Tensor, gen_len: int, device):
    """The no-cache baseline on the first `len(prefix)` prefixes: (tokens, seconds)."""
    return timed(lambda: greedy_no_cache(model, [[BOS]] * len(prefix), prefix=prefix, eos_id=-1,
                                         max_gen_len=gen_len), device)


def time_hf(model: Transformer, prefix: torch.Tensor, c: dict, device, log) -> Dict[int, tuple]:
    """transformers' generate at each of c["hf_batches"]: {batch: (tokens, seconds, peak MiB)}."""
    hf = hf_model(model)
    if hf is None:
        log("  transformers is not installed (pip install -e .[bench]): its column is skipped")
        return {}
    embeds = torch.cat([prefix, model.embed(torch.full((len(prefix), 1), BOS, device=device))], 1)
    out = {}
    for b in c["hf_batches"]:
        def run():
            toks = []
            for s in range(0, len(embeds), b):
                toks += hf_generate(hf, embeds[s:s + b], c["gen_len"])
            return toks
        with PeakMemory(device) as mem:
            toks, dt = timed(run, device)
        out[b] = (toks, dt, mem.extra_mb)
    return out


def rates(n: int, gen_len: int, dt: float) -> dict:
    return {"captions_s": n / dt, "tokens_s": n * gen_len / dt}


def static_decoder_bench(model: Transformer, c: dict, device, modes: List[str], prefix: torch.Tensor, reference,
                         log) -> dict:
    """Ours with the fixed-shape decoders (static_decode.py) at each batch size on `prefix`:
    captions/s and whether the captions equal the eager decoder's `reference`: its captions at each
    batch size ({batch: captions}; in fp16 on a GPU another batch size rounds differently), or one
    list for all. A mode that fails is reported, not fatal."""
    from ..llama.static_decode import StaticDecoder

    n, L = c["images"], c["gen_len"]
    out = {}
    packed = model.pack_weights()  # as the eager decoder was timed (CPU)
    for mode in modes:
        try:
            decoder = StaticDecoder(model, mode, sizes=c["batches"], window=c["prefix"] + 1 + L)
            rows = {}
            for b in c["batches"]:
                toks, dt, extra = time_ours(model, prefix, b, L, device, decoder)
                want = reference[b] if isinstance(reference, dict) else reference
                same = sum(x == y for x, y in zip(toks, want))
                rows[b] = dict(rates(n, L, dt), peak_extra_mb=extra, identical=same)
                log(f"  ours, {mode} decoder, batch {b:3d}: {n / dt:9.2f} captions/s  {n * L / dt:10.1f} tokens/s  "
                    f"(+{extra:.0f} MiB; {same}/{n} captions as the eager decoder's at batch {b})")
            out[mode] = rows
        except Exception as e:  # an untried GPU path must not cost the other figures
            out[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log(f"  ours, {mode} decoder: failed ({out[mode]['error']})")
    if packed:
        model.unpack_weights()
    return out


def decode_bench(model: Transformer, c: dict, device, log, static_modes: List[str] = ()) -> dict:
    """Captions/s three ways on the same prefixes (and ours with the fixed-shape decoders of
    `static_modes`); checks that the captions agree.

    On a CPU ours decodes from oneDNN-packed weights, as captioning_inference.py does; it is also
    timed on the plain weights at the largest batch, and the no-cache baseline on both, so the
    table separates what the cache and batching bring from what the packing brings."""
    n, L, k, top = c["images"], c["gen_len"], c["no_cache_images"], max(c["batches"])
    prefix = decode_prefixes(model, c, device)
    res, agree = {"ours": {}, "hf": {}}, {}
    packed = model.pack_weights()
    reference, eager = None, {}
    for b in c["batches"]:
        toks, dt, extra = time_ours(model, prefix, b, L, device)
        eager[b] = toks
        res["ours"][b] = dict(rates(n, L, dt), peak_extra_mb=extra)
        log(f"  ours{' (packed weights)' if packed else ''} batch {b:3d}: {n / dt:9.2f} captions/s  "
            f"{n * L / dt:10.1f} tokens/s  (+{extra:.0f} MiB)")
        if reference is None:
            reference = toks
            continue
        same = sum(x == y for x, y in zip(toks, reference))
        agree[f"batch{b}"] = same == n
        if same != n:  # another batch size may pick other kernels, which round differently (fp16 on a GPU)
            log(f"  batch {b}: {same}/{n} captions identical to batch {c['batches'][0]}")
    if packed:
        toks, dt = time_no_cache(model, prefix[:k], L, device)
        res["no_cache_packed"] = dict(rates(k, L, dt), images=k)
        log(f"  no-cache baseline (one image at a time) on the packed weights: {k / dt:9.3f} captions/s")
        agree["no_cache_packed"] = toks == reference[:k]
        model.unpack_weights()
        toks, dt, _ = time_ours(model, prefix, top, L, device)
        res["ours_plain"] = {top: rates(n, L, dt)}
        log(f"  ours on the plain weights, batch {top:3d}: {n / dt:9.2f} captions/s")
        agree["ours_plain"] = toks == reference
    toks, dt = time_no_cache(model, prefix[:k], L, device)
    res["no_cache"] = dict(rates(k, L, dt), images=k)
    log(f"  no-cache baseline (one image at a time){' on the plain weights' if packed else ''}: {k / dt:9.3f} captions/s")
    agree["no_cache"] = toks == reference[:k]
    for b, (toks, dt, extra) in time_hf(model, prefix, c, device, log).items():
        res["hf"][b] = dict(rates(n, L, dt), peak_extra_mb=extra)
        log(f"  transformers generate batch {b:3d}: {n / dt:9.2f} captions/s")
        same = sum(x == y for x, y in zip(toks, reference))
        agree[f"hf_batch{b}"] = same == n
        if same != n:
            tok_same = sum(a == b_ for x, y in zip(toks, reference) for a, b_ in zip(x, y))
            log(f"  transformers batch {b}: {same}/{n} captions identical ({tok_same / (n * L):.1%} of tokens)")
    res["captions_identical"] = agree
    if static_modes:
        res["static"] = static_decoder_bench(model, c, device, static_modes, prefix, eager, log)
    res["ratio_vs_no_cache"] = res["ours"][top]["captions_s"] / res["no_cache"]["captions_s"]
    if packed:
        res["ratio_vs_no_cache_packed"] = res["ours"][top]["captions_s"] / res["no_cache_packed"]["captions_s"]
        res["ratio_packed_vs_plain"] = res["ours"][top]["captions_s"] / res["ours_plain"][top]["captions_s"]
    if top in res["hf"]:
        res["ratio_vs_hf"] = res["ours"][top]["captions_s"] / res["hf"][top]["captions_s"]
    return res


def caption_lengths(n: int, seed: int = 0) -> List[int]:
    """`n` caption lengths in LLaMA tokens, as COCO's run: 8 + Gamma(shape 3, scale 2), rounded and
    kept within [8, 30] (mean 14, sd 3.5, a longer tail above than below). A stand-in for COCO's
    distribution (captions of 8 to ~30 tokens, mean about 14), not measured on it."""
    rng = random.Random(seed)
    return [min(LONGEST_CAPTION, max(8, round(8 + rng.gammavariate(3.0, 2.0)))) for _ in range(n)]


def fastest_alternating(fns, device, rounds: int):
    """Each of `fns` once to warm up, then `rounds` rounds running each in turn (a disturbance on a
    shared machine hits all of them alike); the fastest run of each, as [(output, seconds)]."""
    return list(timed_in_turns(dict(enumerate(fns)), device, rounds=rounds, min_seconds=0).values())


def continuous_bench(model: Transformer, c: dict, spec: dict, device, modes: List[str], log, rounds: int = 2) -> dict:
    """Captions/s of the continuous decoder against the batch decoder (StaticDecoder) at each of
    spec["slots"], on spec["requests"] prefixes with `caption_lengths`, in each of `modes`, and
    how many of their captions are identical. A caption ends at its drawn length: the continuous
    decoder's request has that max_gen_len; the batch decoder runs each batch of `slots` captions
    (in arrival order) to its longest length, as it runs to its longest caption's EOS, and each
    row is cut at its own length. No token ends a caption (eos_id -1)."""
    from ..llama.continuous import ContinuousDecoder, Request
    from ..llama.static_decode import StaticDecoder

    n, window = spec["requests"], c["prefix"] + 1 + LONGEST_CAPTION
    lengths = caption_lengths(n)
    g = torch.Generator(device=device).manual_seed(1)
    prefix = torch.randn(n, c["prefix"], model.args.dim, generator=g, device=device).to(model.dtype)
    log(f"  {n} captions of {min(lengths)} to {max(lengths)} tokens (mean {sum(lengths) / n:.1f}; 8 + Gamma(3, 2), "
        f"rounded, within [8, {LONGEST_CAPTION}]), each after a {c['prefix']}-embedding prefix and BOS; a caption ends "
        f"at its drawn length: the continuous decoder's request has it as max_gen_len, the batch decoder runs each batch "
        f"to its longest and cuts each row at its own")
    out = {"lengths": {"n": n, "mean": sum(lengths) / n, "min": min(lengths), "max": max(lengths)}}
    packed = model.pack_weights()  # as the other CPU figures
    for mode in modes:
        rows = {}
        for slots in spec["slots"]:
            batch = StaticDecoder(model, mode, sizes=(slots,), window=window)
            cont = ContinuousDecoder(model, slots, eos_id=-1, mode=mode, window=window)

            def run_batch():
                toks = []
                for s in range(0, n, slots):
                    lens = lengths[s:s + slots]
                    got = batch.generate([[BOS]] * len(lens), eos_id=-1, max_gen_len=max(lens), prefix=prefix[s:s + slots])
                    toks += [t[:k] for t, k in zip(got, lens)]
                return toks

            def run_continuous():
                got = dict(cont.run(Request(prefix[i], [BOS], lengths[i], tag=i) for i in range(n)))
                return [got[i] for i in range(n)]

            (want, tb), (toks, tc) = fastest_alternating([run_batch, run_continuous], device, rounds)
            same = sum(x == y for x, y in zip(toks, want))
            rows[slots] = {"batch_captions_s": n / tb, "continuous_captions_s": n / tc, "ratio": tb / tc,
                           "identical": same}
            log(f"  {mode:>10} {slots:4d} slots: batch decoder {n / tb:8.2f} captions/s, continuous {n / tc:8.2f} "
                f"captions/s ({tb / tc:.2f}x); {same}/{n} captions identical")
        out[mode] = rows
    if packed:
        model.unpack_weights()
    return out


def continuous_main(cfg: "BenchConfig") -> dict:
    """`bench --continuous`: the continuous decoder against the batch decoder (continuous_bench)."""
    c, spec = CONFIGS[cfg.config], CONTINUOUS[cfg.config]
    with distributed.session(mp_size=1, device=cfg.device) as env:
        dev = env.device
        dtype = DTYPES[c["dtype"] if cfg.dtype == "auto" else cfg.dtype] if dev.type == "cuda" else torch.float32
        args = ModelArgs(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], vocab_size=c["vocab"],
                         max_seq_len=c["prefix"] + 1 + LONGEST_CAPTION)
        model = random_model(args, dev, dtype)
        print(f"{machine(dev)}; torch {torch.__version__}; config {cfg.config}: dim {c['dim']}, {c['n_layers']} layers, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {str(dtype).replace('torch.', '')}; "
              f"continuous batching against the batch decoder, the fastest of 2 alternating runs each")
        res = {"machine": machine(dev), "config": cfg.config, "dtype": str(dtype),
               "continuous": continuous_bench(model, c, spec, dev, cfg.decoders, print)}
    if cfg.out:
        write_json(cfg.out, res, indent=1)
        print(f"wrote {cfg.out}")
    return res


def frozen_step_bench(model: Transformer, c: dict, device, log) -> dict:
    """A training step through the frozen LLaMA: prefix gradients only (the GPU figures)."""
    P, L, B = c["prefix"], c["gen_len"], c["train_batch"]
    proj = torch.nn.Linear(64, P * model.args.dim, device=device)
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-4)
    feats = torch.randn(B, 64, device=device)
    tokens = torch.randint(3, model.args.vocab_size, (B, L + 1), device=device)
    targeted = torch.zeros(B, P + L, dtype=torch.bool, device=device)
    targeted[:, P - 1:-1] = True  # the positions that predict tokens[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=model.dtype, enabled=device.type == "cuda"):
            emb = torch.cat([proj(feats).view(B, P, -1).to(model.dtype), model.embed(tokens[:, :-1])], 1)
            logits = model(embeddings=emb, logits_at=targeted)
            loss = torch.nn.functional.cross_entropy(logits, tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with PeakMemory(device) as mem:
        _, dt = timed(step, device, repeat=3)
    n_params = sum(p.numel() for p in model.parameters())
    T = P + L
    # Frozen weights: forward 2*N*T, backward 2*N*T for activation gradients only (no weight grads).
    flops = 4 * n_params * B * T / dt
    out = {"samples_s": B / dt, "peak_extra_mb": mem.extra_mb, "model_tflops": flops / 1e12}
    log(f"  training step through frozen LLaMA, batch {B}: {B / dt:.1f} samples/s, "
        f"{flops / 1e12:.1f} TFLOP/s (4*N*T per sample), +{mem.extra_mb:.0f} MiB")
    return out


def cache_vs_fly_bench(log, steps: int = 8, batch: int = 32, root: str = "demo_runs",
                       scale: str = "full", windows: int = 3) -> Optional[dict]:
    """Training samples/s with the demo's stand-ins: features from the cache vs CLIP on the fly.

    Both runs see the same batches in the same order; after a warm-up window each keeps the
    fastest of `windows` windows of `steps` steps, and reports the mean time a batch of that
    window spent loading, in CLIP and in the training step, and the loss of the first batch."""
    paths = demo_layout(root, scale)
    feats_dir = os.path.join(paths["features"], "train")
    if not os.path.isfile(os.path.join(feats_dir, "meta.json")):
        log("  the demo's stand-ins and feature cache are not built yet (make demo): cache-vs-on-the-fly skipped")
        return None
    enc = ClipEncoder(EncoderSpec.of(paths["clip"]), "cpu")
    llama, tok = load_llama(paths["ckpt_dir"], paths["tokenizer"], max_seq_len=64)
    recs = drop_missing(load_coco(paths["train_images"], paths["train_ann"]), log=lambda m: None)
    spec = CaptionerSpec.build(enc.spec, enc.feature_shape, "mlp", 10, None, llama.args.dim, CaptionStyle())
    out = {}
    for mode in ("on_the_fly", "cache"):
        torch.manual_seed(0)
        proj = spec.new_projection()
        cap = Captioner(llama, tok, proj)
        opt = torch.optim.AdamW(proj.parameters(), lr=1e-4)
        ds = CaptionDataset(recs, enc.preprocess, FeatureCache(feats_dir) if mode == "cache" else None, "one")
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(0))
        if len(loader) < (1 + windows) * steps:
            raise UserError(f"{paths['train_ann']}: {len(ds)} training images make {len(loader)} batches of "
                            f"{batch}, fewer than the {(1 + windows) * steps} this benchmark runs")
        it = iter(loader)
        losses = []

        def window():
            """`steps` training steps; the mean ms a batch spent loading, in CLIP and training."""
            ms = {"load": 0.0, "encode": 0.0, "train": 0.0}
            for _ in range(steps):
                t0 = time.perf_counter()
                b = next(it)
                t1 = time.perf_counter()
                f = b["features"] if "features" in b else enc(b["pixels"])
                t2 = time.perf_counter()
                loss, n = cap.caption_loss(f, b["caption"])
                (loss / n).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                losses.append(float(loss.detach()) / n)
                for k, dt in zip(ms, (t1 - t0, t2 - t1, t3 - t2)):
                    ms[k] += 1000 * dt / steps
            return ms

        with PeakMemory(torch.device("cpu")) as mem:
            ms, dt = timed(window, torch.device("cpu"), repeat=windows, max_repeat=windows)
        out[mode] = {"samples_s": steps * batch / dt, "peak_extra_mb": mem.extra_mb, "batch_ms": ms,
                     "first_loss": losses[0]}
        log(f"  training from {'the feature cache' if mode == 'cache' else 'images, CLIP on the fly'}: "
            f"{steps * batch / dt:8.1f} samples/s  (a batch: loading {ms['load']:.1f} ms, CLIP {ms['encode']:.1f} ms, "
            f"LLaMA + projection step {ms['train']:.1f} ms)")
    out["ratio"] = out["cache"]["samples_s"] / out["on_the_fly"]["samples_s"]
    log(f"  cache / on the fly: {out['ratio']:.2f}x")
    return out


ENCODERS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "EVA02-L-14", "ViT-SO400M-14-SigLIP")


def encoder_bench(archs, batch: int, log) -> dict:
    """Per open_clip architecture (random weights: nothing is downloaded): the features it gives,
    the prefix length patch features imply, its weights' memory and the CPU time to encode one
    image (pooled features, fastest of the timed runs at `batch` images a call)."""
    import open_clip

    out = {}
    log(f"  {'encoder':22} {'pooled':>6} {'patch grid':>10} {'width':>5} {'prefix (patch)':>14} "
        f"{'params':>8} {'fp32 MiB':>8} {'ms/image':>8}")
    for arch in archs:
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
        spec = EncoderSpec(OPEN_CLIP + arch, "random", "patch", -2)
        patch = OpenClipEncoder(spec, model=model, preprocess=preprocess)
        pooled = OpenClipEncoder(EncoderSpec(OPEN_CLIP + arch, "random"), model=model, preprocess=preprocess)
        n_params = sum(p.numel() for p in patch.visual.parameters())
        size = patch.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        images = torch.randn(batch, 3, *size)
        _, dt = timed(functools.partial(pooled, images), torch.device("cpu"), repeat=2, min_seconds=0, max_repeat=2)
        grid, width = patch.feature_shape
        out[arch] = {"pooled_dim": pooled.feature_shape[0], "patch_tokens": grid, "patch_width": width,
                     "image_size": list(size), "params_m": n_params / 1e6, "fp32_mib": n_params * 4 / 2**20,
                     "ms_per_image": 1000 * dt / batch}
        r = out[arch]
        log(f"  {arch:22} {r['pooled_dim']:6d} {f'{int(grid ** 0.5)}x{int(grid ** 0.5)}':>10} {width:5d} "
            f"{grid:14d} {r['params_m']:7.0f}M {r['fp32_mib']:8.0f} {r['ms_per_image']:8.0f}")
        del model, patch, pooled
    return out


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


@dataclass
class BenchConfig(Config):
    config: str = setting("cpu", "cpu (dim 512, 8 layers, 32000 words), 7b (LLaMA-7B's shape, for a GPU) or tiny.")
    device: str = setting("auto", "auto, cpu or cuda.")
    out: str = setting("bench.json", "JSON file for the figures ('' for none).")
    train: bool = setting(True, "also measure training steps.")
    encoders: Optional[List[str]] = setting(None, f"instead: the image encoders table, for these open_clip architectures (e.g. '[\"ViT-B-32\", \"ViT-L-14\"]'; 'all': {', '.join(ENCODERS)}).")
    encoder_batch: int = setting(4, "images per encoder call in the encoders table.")
    dtype: str = setting("auto", "the model's dtype on CUDA: auto (the config's: fp16 for 7b, as the figures in the README), fp16 or bf16. fp32 on a CPU.")
    decoders: List[str] = setting(("static",), "also time ours with these fixed-shape decoders: static (eager), compile (torch.compile), cuda_graph (CUDA only); '[]' for none.")
    continuous: bool = setting(False, "instead: captions/s of continuous batching against the batch decoder at 8, 32 and 64 slots, captions of COCO-like lengths, in the --decoders modes.")

    def check(self) -> None:
        self.one_of("config", CONFIGS)
        self.one_of("dtype", DTYPE_NAMES)
        from ..llama.static_decode import MODES

        for mode in self.decoders:
            if mode not in MODES[1:]:
                raise UserError(f"--decoders: {mode!r} is not one of {', '.join(MODES[1:])}")
        self.at_least(1, "encoder_batch")
        if self.encoders == ["all"]:
            self.encoders = list(ENCODERS)


def print_decode_summary(d: dict, c: dict, dev, n_params: int, dtype) -> None:
    top = max(c["batches"])
    print(f"  ours batch {top} vs the no-cache baseline: {d['ratio_vs_no_cache']:.1f}x"
          + (f" (vs the baseline on the packed weights: {d['ratio_vs_no_cache_packed']:.1f}x; packed vs plain "
             f"weights: {d['ratio_packed_vs_plain']:.2f}x)" if "ratio_vs_no_cache_packed" in d else "")
          + (f"; vs transformers at the same batch: {d['ratio_vs_hf']:.2f}x" if "ratio_vs_hf" in d else ""))
    if dev.type != "cuda":
        return
    weight_bytes = n_params * torch.finfo(dtype).bits // 8
    peak = card_peaks(dev)
    tables = [("eager", d["ours"])] + [(m, r) for m, r in d.get("static", {}).items() if "error" not in r]
    for name, rows in tables:
        for b, r in rows.items():
            bw = r["tokens_s"] / b * weight_bytes / 1e9
            r["weight_gb_s"] = bw
            print(f"  {name:>10} batch {b:3d}: {r['tokens_s']:9.0f} tokens/s, weights read at {bw:7.0f} GB/s"
                  + (f" ({bw / peak[1]:.0%} of {peak[1]:.0f} GB/s)" if peak else ""))
    name, b, best = max(((n, b, r["captions_s"]) for n, rows in tables for b, r in rows.items()), key=lambda x: x[2])
    d["val2014_minutes"] = VAL2014_IMAGES / best / 60
    print(f"  captioning val2014 ({VAL2014_IMAGES} images) at the best rate ({name}, batch {b}, {best:.1f} captions/s, "
          f"{c['gen_len']} tokens each): {d['val2014_minutes']:.1f} minutes on this card")


def card_peaks(dev):
    return next((v for k, v in PEAKS.items() if k in machine(dev)), None)


def bench(cfg: BenchConfig) -> dict:
    if cfg.out:
        check_output_file(cfg.out, "--out")
    if cfg.encoders:
        print(f"{machine(torch.device('cpu'))}; torch {torch.__version__}; image encoders, random weights, fp32, "
              f"batch {cfg.encoder_batch}")
        res = {"machine": machine(torch.device("cpu")), "encoders": encoder_bench(cfg.encoders, cfg.encoder_batch, print)}
        if cfg.out:
            write_json(cfg.out, res, indent=1)
        return res
    if cfg.continuous:
        return continuous_main(cfg)
    c = CONFIGS[cfg.config]
    with distributed.session(mp_size=1, device=cfg.device) as env:
        dev = env.device
        name = c["dtype"] if cfg.dtype == "auto" else cfg.dtype
        dtype = DTYPES[name] if dev.type == "cuda" else torch.float32
        args = ModelArgs(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], vocab_size=c["vocab"],
                         max_seq_len=c["prefix"] + 1 + c["gen_len"] + 8)
        model = random_model(args, dev, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{machine(dev)}; torch {torch.__version__}; config {cfg.config}: dim {c['dim']}, {c['n_layers']} layers, "
              f"{n_params / 1e6:.1f}M parameters, {str(dtype).replace('torch.', '')}; prefix {c['prefix']} + BOS, "
              f"{c['gen_len']} tokens per caption")
        res = {"machine": machine(dev), "config": cfg.config, "params": n_params, "dtype": str(dtype),
               "decode": decode_bench(model, c, dev, print, cfg.decoders)}
        print_decode_summary(res["decode"], c, dev, n_params, dtype)
        if cfg.train:
            res["train_frozen"] = frozen_step_bench(model, c, dev, print)
            peak = card_peaks(dev) if dev.type == "cuda" else None
            if peak:
                res["train_frozen"]["mfu"] = res["train_frozen"]["model_tflops"] / peak[0]
                print(f"  model FLOPs utilisation: {res['train_frozen']['mfu']:.1%} of {peak[0]:.0f} TFLOP/s")
            if dev.type == "cuda":
                hours = COCO_TRAIN_CAPTIONS / res["train_frozen"]["samples_s"] / 3600
                res["train_frozen"]["coco_epoch_hours"] = hours
                print(f"  one epoch of COCO train ({COCO_TRAIN_CAPTIONS} captions) at this rate: {hours:.2f} hours on this card")
            if cfg.config == "cpu":
                del model
                res["cache_vs_fly"] = cache_vs_fly_bench(print)
        if cfg.out:
            write_json(cfg.out, res, indent=1)
            print(f"wrote {cfg.out}")
        return res


main = command(BenchConfig, bench, "Benchmark decoding and training throughput and memory.")
