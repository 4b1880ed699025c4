"""`python -m llama_caption bench-captioners`: the memory of serving several captioners over one LLaMA.

    python -m llama_caption bench-captioners                  # Llama-2-7B shape, bf16, CPU: 1, 2 and 4 captioners
    python -m llama_caption bench-captioners --shape tiny     # seconds

Written once to a scratch folder: random bf16 weights of the LLaMA shape (bench-load's, a
Hugging Face folder one layer per file), a small stand-in CLIP, and as many trained-run folders
as the largest count, each with its own random projection of training's default kind (mlp, 10
prefix tokens from the pooled feature, hidden width the LLaMA's; fp32, as training writes it).
Then, for each count N, a fresh process opens N of them as `serve` does (opening.open_captioners:
the LLaMA and the CLIP once, one projection each; --dtype bf16 on the CPU), reads every weight
once, and reports its resident memory above what it held before opening them (and all of it).
The table gives each count's memory against one captioner's.
"""

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..config import Config, command, setting
from ..errors import UserError
from ..fileio import check_output_file, write_json
from .bench_load import SHAPES, rss_parts, write_hf_by_layer

GIB = 2 ** 30


@dataclass
class CaptionersBenchConfig(Config):
    shape: str = setting("7b", "the LLaMA shape: 7b (Llama-2-7B, 12.6 GiB in bf16), 1b (Llama-3.2-1B) or tiny.")
    counts: List[int] = setting((1, 2, 4), "how many captioners to open over the one LLaMA, one process each: --counts 1,2,4.")
    dir: Optional[str] = setting(None, "scratch folder for the random LLaMA and runs (default: a temporary one, removed after; a folder given is reused when it holds them).")
    out: Optional[str] = setting(None, "also write the figures as JSON to this file.")
    worker: Optional[str] = setting(None, "(internal) open the runs in --runs over this LLaMA folder and report to --out.")
    runs: List[str] = setting((), "(internal) the run folders the worker opens.")

    def check(self) -> None:
        self.one_of("shape", SHAPES)
        self.runs = [r for item in self.runs for r in item.split(",") if r]
        if not self.worker and (not self.counts or min(self.counts) < 1 or max(self.counts) > 64):
            raise UserError(f"--counts must be whole numbers from 1 to 64, got {self.counts}")
        if self.out:
            check_output_file(self.out, "--out")


def write_runs(root: str, llama_dir: str, n: int, log) -> List[str]:
    """`n` run folders over the LLaMA in `llama_dir`, each a random projection of training's
    default kind saved as training saves it, and the stand-in CLIP they were trained with."""
    from ..captioner import CaptionerSpec, CaptionStyle
    from ..llama.checkpoint import open_checkpoint
    from ..runs import save_checkpoint
    from ..vision import EncoderSpec
    from .testing import build_tiny_clip

    llama = open_checkpoint(llama_dir)
    clip = os.path.join(root, "clip.pt")
    if not os.path.isfile(clip):  # (the runs written with it record its bytes' hash)
        build_tiny_clip(clip, embed_dim=128, width=128, seed=0)
    spec = CaptionerSpec.build(EncoderSpec.of(clip), (128,), "mlp", 10, None, llama.args.dim, CaptionStyle())
    spec = dataclasses.replace(spec, llama_architecture=tuple(llama.architecture()))
    runs = []
    for i in range(n):
        out = os.path.join(root, f"run{i}")
        runs.append(out)
        if os.path.isfile(os.path.join(out, "checkpoints", "latest")):
            continue
        weights = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) * 0.02
                   for k, v in spec.new_projection().state_dict().items()}
        if i == 0:
            log(f"writing {n} runs' projections ({sum(v.numel() for v in weights.values()) * 4 / GIB:.2f} GiB each, "
                f"fp32) to {root}")
        flags = {"ckpt_dir": llama_dir, "clip_model": clip, "projection": "mlp", "prefix_len": 10, "quantize": "none"}
        save_checkpoint(out, 1, weights, spec, flags, {"state": {}, "param_groups": []}, {})
    return runs


def worker(cfg: CaptionersBenchConfig) -> None:
    """One process: open the runs over the LLaMA, read every weight, report resident memory."""
    from .. import distributed
    from ..llama.decoding import Decoding
    from ..opening import CaptionerSettings, open_captioners
    from .bench import PeakMemory

    with distributed.session(device="cpu") as env:
        settings = CaptionerSettings(ckpt_dir=cfg.worker, checkpoint=cfg.runs[0], device="cpu", dtype="bf16",
                                     decoder="eager", pack_weights=False)
        before, parts_before = PeakMemory.rss(), rss_parts()
        opened = open_captioners(settings, {f"c{i}": r for i, r in enumerate(cfg.runs)}, env,
                                 Decoding(max_gen_len=30), 1, graphs=False)
        first = next(iter(opened.values()))
        tensors = [p for op in opened.values() for p in op.captioner.projection.parameters()]
        for p in tensors + list(first.captioner.llama.parameters()):
            p.max()  # every page read once: memory-mapped weights count as they would once used
        after = rss_parts()
        write_json(cfg.out, {
            "captioners": len(opened), "rss_above_start": PeakMemory.rss() - before, "rss": PeakMemory.rss(),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "anon_above_start": after["RssAnon"] - parts_before["RssAnon"],
            "llama_bytes": sum(p.numel() * p.element_size() for p in first.captioner.llama.parameters()),
            "projection_bytes": sum(p.numel() * p.element_size() for p in first.captioner.projection.parameters()),
            "llamas": len({id(op.captioner.llama) for op in opened.values()}),
            "encoders": len({id(op.encoder) for op in opened.values()})})


def run(cfg: CaptionersBenchConfig) -> None:
    if cfg.worker:
        return worker(cfg)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    scratch = cfg.dir or tempfile.mkdtemp(prefix="bench_captioners_")
    os.makedirs(scratch, exist_ok=True)
    try:
        llama_dir = os.path.join(scratch, "hf")
        if not os.path.isfile(os.path.join(llama_dir, "config.json")):
            write_hf_by_layer(scratch, cfg.shape, log)
        runs = write_runs(scratch, llama_dir, max(cfg.counts), log)
        rows = []
        for n in sorted(set(cfg.counts)):
            log(f"opening {n} captioner(s) over the {cfg.shape} LLaMA in a fresh process...")
            out = os.path.join(scratch, f"figures-{n}.json")
            cmd = [sys.executable, "-m", "llama_caption", "bench-captioners", "--worker", llama_dir, "--runs",
                   ",".join(runs[:n]), "--out", out, "--shape", cfg.shape]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if proc.returncode != 0:
                raise RuntimeError(f"opening {n} captioner(s) failed:\n{proc.stderr[-3000:]}")
            with open(out) as f:
                rows.append(json.load(f))
        one = next((r for r in rows if r["captioners"] == 1), rows[0])
        # File-backed pages (the memory-mapped LLaMA) may be evicted while a process runs near the
        # machine's memory, so the table also gives anonymous memory + all of the LLaMA's weights.
        print(f"{'captioners':>10} {'LLaMAs':>6} {'CLIPs':>5} {'RSS above start GiB':>20} {'anon GiB':>9} "
              f"{'file GiB':>9} {'x one':>6} {'anon+LLaMA GiB':>15} {'x one':>6}")
        for r in rows:
            r["resident_estimate"] = r["anon_above_start"] + r["llama_bytes"]
            r["vs_one"] = r["rss_above_start"] / one["rss_above_start"]
            r["estimate_vs_one"] = r["resident_estimate"] / (one["anon_above_start"] + one["llama_bytes"])
            print(f"{r['captioners']:>10} {r['llamas']:>6} {r['encoders']:>5} {r['rss_above_start'] / GIB:>20.2f} "
                  f"{r['anon_above_start'] / GIB:>9.2f} {(r['rss_above_start'] - r['anon_above_start']) / GIB:>9.2f} "
                  f"{r['vs_one']:>6.3f} {r['resident_estimate'] / GIB:>15.2f} {r['estimate_vs_one']:>6.3f}")
        print(f"the {cfg.shape} LLaMA's weights: {one['llama_bytes'] / GIB:.2f} GiB (bf16); one projection: "
              f"{one['projection_bytes'] / GIB:.2f} GiB (fp32, mlp, 10 prefix tokens)"
              + ("; target: 4 captioners under 1.15x one" if 4 in cfg.counts and 1 in cfg.counts else ""))
        if cfg.out:
            write_json(cfg.out, {"shape": cfg.shape, "rows": rows}, indent=1)
    finally:
        if not cfg.dir:
            shutil.rmtree(scratch, ignore_errors=True)


main = command(CaptionersBenchConfig, run, "Memory of serving 1, 2, 4 ... captioners over one frozen LLaMA.")
