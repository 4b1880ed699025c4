"""Wall time and peak memory of loading a LLaMA, in each checkpoint format, at each model-parallel size.

    python -m llama_caption bench-load                 # Llama-3.2-1B shape, bf16, on the CPU
    python -m llama_caption bench-load --shape tiny    # seconds (the test runs this)

Random bf16 weights of the shape are written to a scratch folder once per format (a Hugging Face
folder with one model.safetensors; Meta's layout at MP 1 and 2, the embedding split on the
vocabulary and tied to the output as Llama 3.2's), plus a 128256-token tiktoken tokenizer.model.
Each load runs in fresh processes under torchrun (one per model-parallel rank): `load_llama`,
then every weight is read once (Meta's shards are memory-mapped, so loading alone would touch
nothing). Each rank reports its wall time, its peak RSS above what it held before loading (and,
after loading, how much of it is anonymous memory and how much is file-backed: pages of the
memory-mapped checkpoint, reclaimable page cache), its share of the weights, and the most
anonymous memory it held while loading (what loading allocated, mapped pages aside); the table
prints the slowest rank and the largest figures. Meta's shards are also loaded at each other
size (`meta (2 shards)` at MP 1: one rank merges them; `meta (1 shard)` at MP 2: each rank cuts
its half), which is what `--model_parallel` does with a Meta folder.

    python -m llama_caption bench-load --shape 7b --quantize '["none","int8","int4"]'

loads the Llama-2-7B shape (random bf16 weights, a Hugging Face folder written one layer at a
time, with a 32000-word tiktoken file) once per `--quantize` mode at model-parallel size 1: the
resident memory of the frozen model in bf16, int8 and int4 (docs/quantization.md).
"""

import base64
import math
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from .. import distributed
from .bench import PeakMemory
from ..config import Config, command, setting
from ..errors import UserError
from ..fileio import check_output_file, write_json

SHAPES = {
    # meta-llama/Llama-3.2-1B: 1.24B parameters, tied embeddings, llama3 rope scaling.
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192, vocab=128256),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=160, vocab=256 + 256),
    # meta-llama/Llama-2-7b: 6.74B parameters, untied; written as a Hugging Face folder only.
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008, vocab=32000, hf_only=True),
}
FORMATS = ("hugging face", "meta")


@dataclass
class LoadBenchConfig(Config):
    shape: str = setting("1b", "the model shape: 1b (Llama-3.2-1B), 7b (Llama-2-7B: a Hugging Face folder, MP 1 only) or tiny.")
    mp: List[int] = setting((1, 2), "the model-parallel sizes to load at (7b: 1).")
    quantize: List[str] = setting(("none",), "load once per --quantize mode in this list (none, int8, int4, nf4), e.g. '[\"none\",\"int8\",\"int4\"]'.")
    dir: Optional[str] = setting(None, "scratch folder for the random checkpoints (default: a temporary one, removed after).")
    out: Optional[str] = setting(None, "also write the figures as JSON to this file.")
    worker: Optional[str] = setting(None, "(internal) load this checkpoint as one torchrun rank and report.")

    def check(self) -> None:
        from ..llama.quantize import check_modes

        self.one_of("shape", tuple(SHAPES))
        self.quantize = check_modes(self.quantize)
        self.mp = [self.mp] if isinstance(self.mp, int) else list(self.mp)
        if not self.mp or min(self.mp) < 1:
            raise UserError(f"--mp {self.mp}: give model-parallel sizes of at least 1")
        if SHAPES[self.shape].get("hf_only"):
            if self.mp not in ([1], [1, 2]):  # (1, 2) is the default, which means "what the shape allows"
                raise UserError(f"--shape {self.shape} loads at model-parallel size 1 only: leave out --mp or pass '[1]'")
            self.mp = [1]


def write_tiktoken_file(path: str, n_base: int) -> None:
    """A tiktoken BPE file with `n_base` ranks: the 256 bytes, then distinct byte strings. Enough
    to load and count; its merges are not a trained tokenizer's."""
    with open(path, "w") as f:
        for i in range(n_base):
            token = bytes([i]) if i < 256 else (i - 256).to_bytes(3, "big") + b"\x00"
            f.write(f"{base64.b64encode(token).decode()} {i}\n")


def shape_args(shape: str):
    from ..llama.model import ModelArgs

    s = SHAPES[shape]
    if shape == "7b":
        return ModelArgs(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], vocab_size=s["vocab"],
                         intermediate_size=s["intermediate_size"], max_seq_len=4096)
    return ModelArgs(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                     vocab_size=s["vocab"], intermediate_size=s["intermediate_size"], rope_theta=500000.0,
                     use_scaled_rope=True, max_seq_len=131072)


def write_hf_by_layer(root: str, shape: str, log) -> dict:
    """A large shape as a Hugging Face folder, one safetensors file per layer, so that at most
    one layer of random weights is in memory while writing."""
    from safetensors.torch import save_file

    from ..llama.huggingface import to_hf_layout
    from ..llama.model import param_shapes
    from .testing import hf_config

    args = shape_args(shape)
    shapes = param_shapes(args)
    groups = [[k for k in shapes if not k.startswith("layers.")]]
    groups += [[k for k in shapes if k.startswith(f"layers.{i}.")] for i in range(args.n_layers)]
    folder = os.path.join(root, "hf")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, n_bytes = {}, 0
    total = sum(math.prod(s) for s in shapes.values()) * 2
    log(f"writing random bf16 weights of the {shape} shape ({total / 2**30:.2f} GiB), one file per layer, to {folder}")
    for i, names in enumerate(groups):
        sd = {k: (torch.ones(shapes[k]) if k.endswith("norm.weight") else torch.randn(shapes[k], generator=g) * 0.02)
              .to(torch.bfloat16) for k in names}
        tensors = {k: v.contiguous() for k, v in to_hf_layout(sd, args).items()}
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
        n_bytes += sum(t.numel() * 2 for t in tensors.values())
    write_json(os.path.join(folder, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
    write_json(os.path.join(folder, "config.json"), hf_config(args, False, args.vocab_size - 256,
                                                              args.vocab_size - 255, torch.bfloat16))
    write_tiktoken_file(os.path.join(folder, "tokenizer.model"), args.vocab_size - 256)
    return {"paths": {"hugging face": {1: folder}}, "weight_bytes": n_bytes}


def write_checkpoints(root: str, shape: str, mps: List[int], log) -> dict:
    from ..llama.convert import meta_params
    from ..llama.model import param_shapes
    from .testing import write_hf_checkpoint, write_meta_checkpoint

    if SHAPES[shape].get("hf_only"):
        return write_hf_by_layer(root, shape, log)
    args = shape_args(shape)
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.ones(v) if k.endswith("norm.weight") else torch.randn(v, generator=g) * 0.02).to(torch.bfloat16)
          for k, v in param_shapes(args).items() if k != "output.weight"}
    n_bytes = sum(t.numel() * 2 for t in sd.values())
    log(f"writing random bf16 weights ({n_bytes / 2**30:.2f} GiB per copy) to {root}")
    tok = os.path.join(root, "tokenizer.model")
    write_tiktoken_file(tok, args.vocab_size - 256)
    paths = {}
    hf = os.path.join(root, "hf")
    write_hf_checkpoint(hf, args, sd, dtype=torch.bfloat16, tied=True, bos_id=args.vocab_size - 256,
                        eos_id=args.vocab_size - 255)
    shutil.copy(tok, hf)
    paths["hugging face"] = {mp: hf for mp in mps}
    params = meta_params(args, llama3=True)  # Llama 3.2 1B's: multiple_of 256, ffn_dim_multiplier 1.5
    paths["meta"] = {}
    for mp in mps:
        folder = os.path.join(root, f"meta_mp{mp}")
        write_meta_checkpoint(folder, params, sd, mp=mp, embedding_split="vocab")
        shutil.copy(tok, folder)
        paths["meta"][mp] = folder
    return {"paths": paths, "weight_bytes": n_bytes}


def rss_parts() -> dict:
    """Resident memory now, split into anonymous (allocated) and file-backed (pages of mapped
    files: reclaimable page cache, shared with every process mapping the same file)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                parts[key] = int(value.split()[0]) * 1024
    return parts


class PeakAnon:
    """The most anonymous resident memory seen while a `with` block runs (sampled every 5 ms):
    what loading allocated, without the checkpoint's mapped pages."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_parts()["RssAnon"], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_parts()["RssAnon"])

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_parts()["RssAnon"])


def worker(ckpt_dir: str, out: str, quantize: str = "none") -> None:
    """One torchrun rank: load, read every weight once, report (rank 0 writes all ranks' figures)."""
    import torch.distributed as dist

    from ..llama.checkpoint import load_llama
    from ..llama.quantize import weight_bytes

    env = distributed.setup(device="cpu")
    if quantize != "none":  # the library's own code and kernels in memory before the baseline
        from ..llama.quantize import check_kernels

        check_kernels(quantize, "cpu", torch.bfloat16)
    before, parts_before = PeakMemory.rss(), rss_parts()
    dist.barrier()
    t0 = time.perf_counter()
    with PeakAnon() as anon:
        model, _ = load_llama(ckpt_dir, None, 64, dtype=torch.bfloat16, quantize=quantize)
    load_s = time.perf_counter() - t0
    for p in model.parameters():
        if type(p.data) is torch.Tensor:  # (quantized weights were read as they were made)
            p.max()  # reads every page of a memory-mapped weight, allocates nothing of its size
    total_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = {"load_s": load_s, "load_and_read_s": total_s, "peak_rss_above_start": max(peak, PeakMemory.rss()) - before,
            "rss_after": PeakMemory.rss() - before, "share_bytes": weight_bytes(model),
            "peak_anon_loading": anon.peak - parts_before["RssAnon"]}
    mine.update({f"{k}_after": v - parts_before[k] for k, v in rss_parts().items()})
    ranks = [None] * env.world_size
    dist.all_gather_object(ranks, mine)
    if env.is_main:
        write_json(out, ranks)
    distributed.teardown()


def run_load(ckpt_dir: str, mp: int, scratch: str, quantize: str = "none") -> List[dict]:
    out = os.path.join(scratch, "ranks.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(mp), "--master_addr", "127.0.0.1",
           "--master_port", str(distributed._free_port()), "-m", "llama_caption", "bench-load", "--worker", ckpt_dir, "--out", out,
           "--quantize", quantize]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {ckpt_dir} at MP {mp} failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def bench(cfg: LoadBenchConfig) -> Optional[dict]:
    if cfg.worker:
        return worker(cfg.worker, cfg.out, cfg.quantize[0])
    if cfg.out:
        check_output_file(cfg.out, "--out")
    scratch = cfg.dir or tempfile.mkdtemp(prefix="llama_caption_load_")
    os.makedirs(scratch, exist_ok=True)
    try:
        made = write_checkpoints(scratch, cfg.shape, list(cfg.mp), print)
        gib = 2 ** 30
        print(f"{'format':<15} {'MP':>2} {'quantize':>8} {'load s':>7} {'+read s':>8} {'peak RSS GiB':>13} "
              f"{'anon GiB':>9} {'file GiB':>9} {'share GiB':>10} {'peak anon GiB':>14}")
        rows = []
        # Each format at each size, then Meta's shards loaded at the other sizes (each rank cutting
        # its slice from the stored shards); each once per --quantize mode.
        formats = [f for f in FORMATS if f in made["paths"]]
        runs = [(fmt, mp, mp) for fmt in formats for mp in cfg.mp]
        runs += [("meta", stored, mp) for stored in cfg.mp for mp in cfg.mp if stored != mp and "meta" in formats]
        for (fmt, stored, mp), mode in [(r, q) for r in runs for q in cfg.quantize]:
            ranks = run_load(made["paths"][fmt][stored], mp, scratch, mode)
            row = {"format": fmt, "mp": mp, "quantize": mode, "load_s": max(r["load_s"] for r in ranks),
                   "load_and_read_s": max(r["load_and_read_s"] for r in ranks),
                   "peak_rss_bytes": max(r["peak_rss_above_start"] for r in ranks),
                   "anon_bytes": max(r["RssAnon_after"] for r in ranks),
                   "file_bytes": max(r["RssFile_after"] for r in ranks),
                   "share_bytes": max(r["share_bytes"] for r in ranks),
                   "peak_anon_bytes": max(r["peak_anon_loading"] for r in ranks), "ranks": ranks}
            label = fmt
            if fmt == "meta":
                row["stored_mp"] = stored
                label = f"meta ({stored} shard{'s' if stored > 1 else ''})"
            rows.append(row)
            print(f"{label:<15} {mp:>2} {mode:>8} {row['load_s']:7.2f} {row['load_and_read_s']:8.2f} "
                  f"{row['peak_rss_bytes'] / gib:13.2f} {row['anon_bytes'] / gib:9.2f} {row['file_bytes'] / gib:9.2f} "
                  f"{row['share_bytes'] / gib:10.2f} {row['peak_anon_bytes'] / gib:14.2f}")
        res = {"shape": cfg.shape, "weight_bytes": made["weight_bytes"], "loads": rows}
        if cfg.out:
            write_json(cfg.out, res, indent=1)
        return res
    finally:
        if cfg.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


main = command(LoadBenchConfig, bench, "Time the loading of a random Llama-3.2-1B-shaped (or 7B) checkpoint in each format, MP size and --quantize mode.")
