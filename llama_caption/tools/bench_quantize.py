"""What `--quantize` costs and saves: decoding speed and weight memory of a random LLaMA per
mode, and the caption metrics of the newest `make demo` run's projection per mode.

    python -m llama_caption bench-quantize                  # CPU: the bench's cpu shape, the demo's CIDEr
    python -m llama_caption bench-quantize --config 7b      # a GPU: tokens/s and % of bandwidth

Decoding: the same random model (`make bench`'s shape) is made once per mode and timed as
`caption` runs it with `--decoder auto` (static on a CPU, CUDA graphs on CUDA, eager for nf4
there; on a CPU every full-precision linear layer oneDNN-packed: all of them at none, the output
layer otherwise), the quantized modes through their kernels; greedy captions of the same
prefixes at batch 1 and 32, each caption `gen_len` tokens, and the share of captions equal to
full precision's; the weight bytes one step reads (all but the token embedding) per second at
batch 1, against the card's bandwidth on a known GPU. On CUDA the model is fp16 (bf16 with
--dtype). Every mode's model is made before any timing and the modes are timed in turns
(`timed_in_turns`), so all of them are held at once: at the 7b shape about 26 GiB for none,
int8, int4 and nf4 (12.6 + 6.4 + 3.8 + 3.6); name fewer --quantize modes on a smaller card. A
table at the end puts these beside the demo's metrics. The 7B shape's resident memory per mode
is `bench-load --shape 7b` (it loads a written checkpoint, as a run does).

Metrics: `caption` on the demo's validation images, once per mode, from the same trained
projection (skipped with --demo '' or when there is no finished demo run).
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import List

import torch

from .. import distributed
from ..config import Config, command, setting
from ..errors import UserError
from ..fileio import check_output_file, write_json
from ..llama.model import ModelArgs
from ..llama.quantize import MODES, UNCOMPILED, check_modes, quantize_model, weight_bytes
from ..llama.static_decode import make_decoder
from ..runtime import DTYPE_NAMES, DTYPES
from .bench import CONFIGS, card_peaks, decode_prefixes, decode_run, machine, timed_in_turns
from .testing import random_model


@dataclass
class QuantBenchConfig(Config):
    config: str = setting("cpu", "model shape: cpu (dim 512, 8 layers, 32000 words), 7b (for a GPU) or tiny.")
    quantize: List[str] = setting(MODES, "the --quantize modes to compare (none, the reference, is always run; all are held in memory at once).")
    batches: List[int] = setting((1, 32), "decoding batch sizes.")
    images: int = setting(0, "captions decoded per batch size (0: the config's, 32 for cpu); at batch 1 at most 8 are timed.")
    gen_len: int = setting(0, "tokens per caption (0: the config's, 20).")
    device: str = setting("auto", "auto, cpu or cuda.")
    dtype: str = setting("auto", "the model's dtype on CUDA: auto (fp16), fp16 or bf16; fp32 on a CPU.")
    demo: str = setting("demo_runs", "the demo runs folder whose newest finished run is captioned per mode ('' to skip).")
    out: str = setting("bench_quantize.json", "JSON file for the figures ('' for none).")

    def check(self) -> None:
        self.one_of("config", CONFIGS)
        self.one_of("dtype", DTYPE_NAMES)
        self.quantize = check_modes(self.quantize)
        if "none" not in self.quantize:
            self.quantize = ["none"] + self.quantize
        if isinstance(self.batches, int):
            self.batches = [self.batches]
        if not self.batches or min(self.batches) < 1:
            raise UserError(f"--batches {self.batches}: give positive batch sizes")
        if len(set(self.batches)) < len(self.batches):
            raise UserError(f"--batches {self.batches} names a batch size twice: give each once")
        self.at_least(0, "images", "gen_len")


def bench_decoder(dev, mode: str) -> str:
    """The decoder `--decoder auto` gives `caption` on one device: static on a CPU, CUDA graphs on
    CUDA (eager for nf4, whose library's layers the graph decoders do not take)."""
    if dev.type != "cuda":
        return "static"
    return "eager" if mode in UNCOMPILED else "cuda_graph"


def step_bytes(model) -> int:
    """Weight bytes one decoding step reads: every weight but the token embedding (one row of it)."""
    emb = model.tok_embeddings.weight
    shared = model.output.weight is emb if hasattr(model.output, "weight") else False
    return weight_bytes(model) - (0 if shared else emb.numel() * emb.element_size())


def decode_table(cfg: QuantBenchConfig, c: dict, dev, dtype, log) -> dict:
    """Every mode's model is made first, then each batch size is timed with the modes in turns
    (`timed_in_turns`), so that the ratios compare runs made at the same moments."""
    L = cfg.gen_len or c["gen_len"]
    c = dict(c, images=cfg.images or c["images"], gen_len=L)
    args = ModelArgs(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], vocab_size=c["vocab"],
                     max_seq_len=c["prefix"] + 1 + L + 8)
    peak = card_peaks(dev) if dev.type == "cuda" else None
    rows, models = {}, {}
    for mode in cfg.quantize:
        model = models[mode] = random_model(args, dev, dtype)
        quantize_model(model, mode)
        # As `caption` runs it: on a CPU every full-precision linear layer (at none all of them, else
        # the output layer where a mode keeps it) multiplies by a oneDNN-packed copy.
        packed = model.pack_weights()
        rows[mode] = {"weight_bytes": weight_bytes(model), "step_bytes": step_bytes(model), "packed": packed,
                      "decoder": bench_decoder(dev, mode), "batches": {}}
    prefix = decode_prefixes(models["none"], c, dev)
    for b in cfg.batches:
        n = len(prefix) if b > 1 else min(8, len(prefix))  # one at a time: fewer, or it takes minutes
        batch = min(b, n)  # a batch is at most the captions there are
        runs = {mode: decode_run(m, prefix[:n], batch, L, make_decoder(m, rows[mode]["decoder"], batch))
                for mode, m in models.items()}
        with torch.no_grad():
            timed = timed_in_turns(runs, dev)
        reference = timed["none"][0]
        for mode, (toks, dt) in timed.items():
            row = rows[mode]
            r = row["batches"][b] = {"captions_s": n / dt, "tokens_s": n * L / dt, "captions": n, "batch": batch,
                                     "same_captions": sum(x == y for x, y in zip(toks, reference)) / n}
            if b == 1:
                r["weight_gb_s"] = r["tokens_s"] * row["step_bytes"] / 1e9
                if peak:
                    r["bandwidth_share"] = r["weight_gb_s"] / peak[1]
            label = f"{'none (packed fp32)' if mode == 'none' and row['packed'] else mode}, {row['decoder']}"
            log(f"  {label:>26} batch {batch:3d}: {r['captions_s']:8.2f} captions/s {r['tokens_s']:9.1f} tokens/s  "
                f"weights {row['weight_bytes'] / 2**20:8.1f} MiB  captions equal to none's: {r['same_captions']:.0%}"
                + (f"  weights read {r['weight_gb_s']:.1f} GB/s" if "weight_gb_s" in r else "")
                + (f" ({r['bandwidth_share']:.0%} of {peak[1]:.0f})" if "bandwidth_share" in r else ""))
    del models
    base = rows["none"]["batches"]
    for mode in cfg.quantize[1:]:
        rows[mode]["speed_vs_none"] = {b: rows[mode]["batches"][b]["captions_s"] / base[b]["captions_s"] for b in cfg.batches}
        rows[mode]["memory_vs_none"] = rows[mode]["weight_bytes"] / rows["none"]["weight_bytes"]
        log(f"  {mode}: " + ", ".join(f"batch {base[b]['batch']} {v:.2f}x none's captions/s"
                                      for b, v in rows[mode]["speed_vs_none"].items())
            + f"; weights {rows[mode]['memory_vs_none']:.2f}x")
    return rows


def summary(rows: dict, demo: dict, batches, log) -> None:
    """One table: per mode, captions/s per batch size, weights, bytes read per second at batch 1
    and the demo's caption agreement and CIDEr."""
    log("| mode | decoder | " + " | ".join(f"captions/s, batch {b}" for b in batches)
        + " | weights MiB | weights read/s, batch 1 | same captions (demo) | CIDEr (demo) |")
    log("|---" * (6 + len(batches)) + "|")
    for mode, row in rows.items():
        speeds = [f"{row['batches'][b]['captions_s']:.2f}" + (f" ({row['speed_vs_none'][b]:.2f}x)" if mode != "none" else "")
                  for b in batches]
        r1 = row["batches"].get(1)  # "-" when batch 1 was not run
        read = "-" if r1 is None else f"{r1['weight_gb_s']:.1f} GB/s" + (
            f" ({r1['bandwidth_share']:.0%})" if "bandwidth_share" in r1 else "")
        d = (demo or {}).get(mode)
        same = f"{d['same_captions']:.0%}" if d else "-"
        cider = f"{d['metrics'].get('CIDEr', float('nan')) * 100:.1f}" if d else "-"
        log(f"| {mode} | {row['decoder']} | " + " | ".join(speeds)
            + f" | {row['weight_bytes'] / 2**20:.1f} | {read} | {same} | {cider} |")


def find_demo(cfg: QuantBenchConfig) -> dict:
    """The newest finished demo run under --demo, with its validation annotations (before any timing)."""
    from .demo.build import newest_demo_run

    demo = newest_demo_run(cfg.demo)
    annotations = demo.get("annotations") or os.path.join(os.path.dirname(demo["images"]), "annotations",
                                                          "captions_val2014.json")
    if not os.path.isfile(annotations):
        raise UserError(f"the demo run {demo['checkpoint']} has no validation annotations at {annotations}: rerun `make demo`")
    return dict(demo, annotations=annotations)


def demo_metrics(cfg: QuantBenchConfig, demo: dict, log) -> dict:
    """`caption` on the demo run's validation images once per mode: its metrics."""
    annotations = demo["annotations"]
    out, scratch = {}, tempfile.mkdtemp(prefix="llama_caption_quant_")
    try:
        for mode in cfg.quantize:
            out[mode] = caption_demo(demo, annotations, mode, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = out["none"]["captions"]
    for mode, r in out.items():
        r["same_captions"] = sum(r["captions"].get(k) == v for k, v in base.items()) / max(1, len(base))
        r.pop("captions")
        log(f"  {mode:>5}: CIDEr {r['metrics'].get('CIDEr', float('nan')) * 100:6.1f}  BLEU-4 "
            f"{r['metrics'].get('Bleu_4', float('nan')) * 100:5.1f}  captions equal to none's: {r['same_captions']:.0%}")
    return out


def caption_demo(demo: dict, annotations: str, mode: str, scratch: str) -> dict:
    """`caption` on the demo's validation images at `mode`: {metrics, captions by image id}."""
    from ..inference import InferenceConfig, run

    extra = {"clip_model": demo["clip_model"]} if demo.get("clip_model") else {}
    icfg = InferenceConfig(ckpt_dir=demo["ckpt_dir"], tokenizer_path=demo["tokenizer_path"],
                           checkpoint=demo["checkpoint"], images=demo["images"], annotations=annotations,
                           out=os.path.join(scratch, f"{mode}.json"), device="cpu", num_workers=0, quantize=mode,
                           clipscore=False, **extra)
    icfg.check()
    done = run(icfg)
    return {"metrics": done.get("metrics", {}), "captions": {r["image_id"]: r["caption"] for r in done["results"]}}


def cpu_bytes(c: dict) -> int:
    """What the full-precision reference holds on a CPU: its fp32 weights and the oneDNN-packed
    copy of its linear layers (the quantized modes' models come on top)."""
    args = ModelArgs(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], vocab_size=c["vocab"])
    linear = args.n_layers * (4 * args.dim ** 2 + 3 * args.dim * args.hidden_dim) + args.vocab_size * args.dim
    return 4 * (args.vocab_size * args.dim + 2 * linear)


def check_cpu_memory(cfg: QuantBenchConfig, c: dict) -> None:
    """Refuse, in one line, a shape whose fp32 reference does not fit in this machine's memory."""
    need = cpu_bytes(c)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if need > available:
        raise UserError(f"--config {cfg.config} on the CPU needs about {need / 2**30:.0f} GiB for its fp32 reference "
                        f"(weights and their oneDNN-packed copy), more than the {available / 2**30:.0f} GiB free here: "
                        f"run it on a GPU (--device cuda) or use --config cpu")


def bench(cfg: QuantBenchConfig) -> dict:
    if cfg.out:
        check_output_file(cfg.out, "--out")
    c = CONFIGS[cfg.config]
    demo = find_demo(cfg) if cfg.demo else None
    res = {}
    with distributed.session(mp_size=1, device=cfg.device) as env:
        dev = env.device
        if dev.type == "cpu":
            check_cpu_memory(cfg, c)
        dtype = DTYPES["fp16" if cfg.dtype == "auto" else cfg.dtype] if dev.type == "cuda" else torch.float32
        print(f"{machine(dev)}; torch {torch.__version__}; config {cfg.config} (dim {c['dim']}, {c['n_layers']} layers, "
              f"{c['vocab']} words), {str(dtype).replace('torch.', '')}; {cfg.images or c['images']} captions of "
              f"{cfg.gen_len or c['gen_len']} tokens (at batch 1: the first {min(8, cfg.images or c['images'])})")
        res = {"machine": machine(dev), "config": cfg.config, "dtype": str(dtype),
               "decode": decode_table(cfg, c, dev, dtype, print)}
    if cfg.demo:
        print(f"the newest demo run under {cfg.demo}/, captioned once per mode:")
        res["demo"] = {"run": demo["checkpoint"], "modes": demo_metrics(cfg, demo, print)}
    summary(res["decode"], res.get("demo", {}).get("modes"), cfg.batches, print)
    if cfg.out:
        write_json(cfg.out, res, indent=1)
        print(f"wrote {cfg.out}")
    return res


main = command(QuantBenchConfig, bench, "Decoding speed, weight memory and caption metrics per --quantize mode.")
