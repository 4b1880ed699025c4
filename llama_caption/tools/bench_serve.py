"""`python -m llama_caption bench-serve`: the caption server against offline captioning, one run.

    python -m llama_caption bench-serve            # the newest `make demo` run, its validation images

1. Offline, in this process, as `caption` works: the images read and preprocessed by a DataLoader
   (2 workers), encoded and decoded at batch --max_batch (images/s); and one image at a time, from
   its file to its caption (seconds, the median of 9).
2. The real `caption` command over the same images writes the captions every server answer is
   checked against.
3. `serve` in a child process (--port 0), then `loadtest` at each --concurrency, then SIGTERM
   (the server must exit 0).
Prints the load test's table and the three ratios the server is held to; --out keeps them as JSON.
"""

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

from ..config import Config, command, setting
from ..data import list_image_files, open_rgb
from ..errors import UserError


@dataclass
class BenchServeConfig(Config):
    ckpt_dir: Optional[str] = setting(None, "the LLaMA (default: the newest `make demo` run's stand-in).")
    tokenizer_path: Optional[str] = setting(None, "its tokenizer (default: the demo's, with the demo's LLaMA).")
    checkpoint: Optional[str] = setting(None, "the trained run (default: the newest demo run's final one).")
    clip_model: Optional[str] = setting(None, "the checkpoint's CLIP file, when it moved (default: the demo's, with the demo's checkpoint).")
    images: Optional[str] = setting(None, "a folder of images (default: the demo's validation images).")
    num_images: int = setting(64, "use the first N images of the folder.")
    concurrency: List[int] = setting((1, 8, 32), "load-test levels: --concurrency 1,8,32.")
    requests: int = setting(256, "requests per level (one image each).")
    max_batch: int = setting(32, "the server's --max_batch, and the offline batch size.")
    max_wait_ms: float = setting(10.0, "the server's --max_wait_ms.")
    captioners: List[int] = setting((1,), "serve the checkpoint under this many names (one projection loaded per name, over one LLaMA), with the load test's requests spread over them in turn; several counts (--captioners 1,2) run one server each and compare their images/s.")
    decoder: str = setting("auto", "the server's --decoder (continuous: continuous batching over --max_batch slots); the offline figures stay the batch decoder's, `caption`'s default.")
    deepen: int = setting(0, "stack the LLaMA (Meta's format, one file) to this many layers with copies of its last layer whose output projections are zero: the same captions for more decoding work, to load the server where decoding, not HTTP, sets the pace (0: the LLaMA as it is).")
    root: str = setting("demo_runs", "where `make demo` keeps its runs (for the defaults).")
    out: Optional[str] = setting(None, "write the figures as JSON here.")

    def check(self) -> None:
        self.at_least(1, "num_images", "requests", "max_batch")
        self.at_least(0, "deepen")
        from ..opening import DECODERS

        self.one_of("decoder", DECODERS)
        if any(c < 1 for c in self.concurrency):
            raise UserError(f"--concurrency must be at least 1, got {self.concurrency}")
        if not self.captioners or min(self.captioners) < 1 or max(self.captioners) > 16:
            raise UserError(f"--captioners must be whole numbers from 1 to 16, got {self.captioners}")


def offline_figures(cfg: BenchServeConfig, files: List[str], log) -> dict:
    """What `caption` does, timed in this process: images read and preprocessed by its DataLoader
    (2 workers), encoded and decoded at batch max_batch (images/s); and one image at a time, read
    to caption (seconds, the median of 9)."""
    import torch

    from .. import distributed
    from ..data import ImageFiles, ImageRecord, collate
    from ..llama.decoding import Decoding
    from ..opening import CaptionerSettings, open_captioner

    settings = CaptionerSettings(ckpt_dir=cfg.ckpt_dir, tokenizer_path=cfg.tokenizer_path, checkpoint=cfg.checkpoint,
                                 clip_model=cfg.clip_model, device="cpu")
    records = [ImageRecord(i, p, []) for i, p in enumerate(files)]
    greedy = Decoding(max_gen_len=30)  # the server's default
    with distributed.session(settings.mp_size(), "cpu") as env:
        opened = open_captioner(settings, env, greedy, cfg.max_batch)
        encoder = opened.encoder

        def caption(pixels):
            with torch.no_grad():
                return opened.caption(pixels, greedy)

        def all_at_batch() -> float:
            loader = torch.utils.data.DataLoader(ImageFiles(records, encoder.preprocess), batch_size=cfg.max_batch,
                                                 num_workers=2, collate_fn=collate)
            start = time.perf_counter()
            for batch in loader:
                caption(batch["pixels"])
            return len(files) / (time.perf_counter() - start)

        all_at_batch()  # warm-up: the decoder's shapes, the workers' imports
        batch_ips = all_at_batch()
        caption(encoder.preprocess(open_rgb(files[0]))[None])
        singles = []
        for p in files[:9]:
            t0 = time.perf_counter()
            caption(encoder.preprocess(open_rgb(p))[None])
            singles.append(time.perf_counter() - t0)
    log(f"offline: {batch_ips:.2f} images/s at batch {cfg.max_batch}; one image {statistics.median(singles):.3f} s")
    return {"batch_images_per_s": batch_ips, "single_s": statistics.median(singles)}


def defaults_from_demo(cfg: BenchServeConfig) -> None:
    from .demo.build import newest_demo_run

    if cfg.ckpt_dir and cfg.checkpoint and cfg.images:
        return
    demo = newest_demo_run(cfg.root)
    cfg.ckpt_dir = cfg.ckpt_dir or demo["ckpt_dir"]
    if cfg.tokenizer_path is None and cfg.ckpt_dir == demo["ckpt_dir"]:
        cfg.tokenizer_path = demo["tokenizer_path"]
    if cfg.clip_model is None and cfg.checkpoint is None:
        cfg.clip_model = demo.get("clip_model")
    cfg.checkpoint = cfg.checkpoint or demo["checkpoint"]
    cfg.images = cfg.images or demo["images"]


def deepen(cfg: BenchServeConfig, work: str, log) -> None:
    """--deepen N: a copy of the LLaMA with N layers, the ones added copies of its last layer with
    the attention output and FFN down projections zero, so each adds nothing to the residual
    stream (the captions are the LLaMA's) and costs a layer's work; and a copy of the checkpoint
    that records that LLaMA. cfg then names the copies."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..fileio import write_json
    from ..llama.checkpoint import META, open_checkpoint
    from ..llama.meta import load_shard
    from ..opening import free_memory
    from ..runs import find_checkpoint

    llama_in = open_checkpoint(cfg.ckpt_dir) if os.path.isdir(cfg.ckpt_dir) else None
    if llama_in is None or llama_in.format != META or len(llama_in.files) != 1:
        raise UserError(f"--deepen needs a LLaMA in Meta's format in one file (params.json + consolidated.00.pth); "
                        f"{cfg.ckpt_dir} is not")
    params, n0 = llama_in.params, llama_in.params["n_layers"]
    if cfg.deepen <= n0:
        raise UserError(f"--deepen {cfg.deepen} must be above the LLaMA's {n0} layers")
    weights = dict(load_shard(llama_in.files[0]))
    layer_bytes = sum(t.numel() * t.element_size() for k, t in weights.items() if k.startswith(f"layers.{n0 - 1}."))
    need = (cfg.deepen - n0) * layer_bytes
    free = free_memory("cpu")
    if free is not None and 2 * need > free:  # the stacked weights, then the server's copy of them
        raise UserError(f"--deepen {cfg.deepen}: the stacked LLaMA needs {need / 2 ** 30:.1f} GiB more, held twice, and "
                        f"{free / 2 ** 30:.1f} GiB are free: stack fewer layers")
    last = f"layers.{n0 - 1}."
    for i in range(n0, cfg.deepen):
        for key in [k for k in weights if k.startswith(last)]:
            copy = weights[key].clone()
            if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                copy.zero_()
            weights[key.replace(last, f"layers.{i}.", 1)] = copy
    llama = os.path.join(work, "llama")
    os.makedirs(llama)
    torch.save(weights, os.path.join(llama, "consolidated.00.pth"))
    write_json(os.path.join(llama, "params.json"), dict(params, n_layers=cfg.deepen))
    ckpt = os.path.join(work, "checkpoint")
    shutil.copytree(find_checkpoint(cfg.checkpoint), ckpt)
    path = os.path.join(ckpt, "projection.safetensors")
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps(dict(json.loads(meta["config"]), ckpt_dir=llama), sort_keys=True)
    if "captioner" in meta:  # the recorded LLaMA is the stacked one: its captions are the same
        spec = json.loads(meta["captioner"])
        if spec.get("llama_architecture"):
            spec["llama_architecture"][1] = cfg.deepen
        meta["captioner"] = json.dumps(spec, sort_keys=True)
    save_file(tensors, path, metadata=meta)
    log(f"--deepen {cfg.deepen}: the LLaMA of {cfg.ckpt_dir} stacked from {n0} to {cfg.deepen} layers (the added "
        f"ones add nothing to the residual stream: the same captions)")
    cfg.ckpt_dir, cfg.checkpoint = llama, ckpt


def wait_for_url(path: str, proc: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(path):
            return open(path).read().strip()
        if proc.poll() is not None:
            raise UserError(f"the server exited with status {proc.returncode} before it was ready (its messages are above)")
        time.sleep(0.2)
    raise UserError(f"the server was not ready within {timeout:.0f} s")


def run(cfg: BenchServeConfig) -> None:
    from .loadtest import format_table

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    defaults_from_demo(cfg)
    files = list_image_files([cfg.images])[: cfg.num_images]
    if not files:
        raise UserError(f"--images {cfg.images}: no image files there")
    work = tempfile.mkdtemp(prefix="bench_serve_")
    try:
        folder = os.path.join(work, "images")
        os.makedirs(folder)
        for p in files:
            shutil.copy(p, folder)
        if cfg.deepen:
            deepen(cfg, work, log)
        offline = offline_figures(cfg, files, log)
        llama = ["--ckpt_dir", cfg.ckpt_dir, "--checkpoint", cfg.checkpoint] + (
            ["--tokenizer_path", cfg.tokenizer_path] if cfg.tokenizer_path else []) + (
            ["--clip_model", cfg.clip_model] if cfg.clip_model else [])
        expected = os.path.join(work, "offline.json")
        log("offline captions by `caption` (the reference every server answer is checked against)...")
        subprocess.run([sys.executable, "-m", "llama_caption", "caption", *llama, "--images", folder, "--out", expected,
                        "--batch_size", str(cfg.max_batch), "--num_workers", "0"], check=True, stdout=subprocess.DEVNULL)
        loads = {n: serve_and_load(cfg, llama, folder, expected, n, work, log) for n in sorted(set(cfg.captioners))}
        lines = [f"server --decoder {cfg.decoder}" + (f", LLaMA stacked to {cfg.deepen} layers" if cfg.deepen else "")
                 + f"; offline (in process): {offline['batch_images_per_s']:.2f} images/s at batch {cfg.max_batch}, "
                 f"{offline['single_s']:.3f} s for one image"]
        first, top = min(loads), max(cfg.concurrency)
        figures = dict(offline=offline, **load_figures(cfg, offline, *loads[first], lines), by_captioners={})
        for n, (rows, code) in loads.items():
            label = "1 captioner:\n" if n == 1 else f"{n} captioners over one LLaMA, requests spread over them in turn:\n"
            print((label if len(loads) > 1 or n > 1 else "") + format_table(rows))
            entry = figures["by_captioners"][n] = {"load": rows, "server_exit": code}
            if n != first:
                entry["vs_first"] = images_per_s(rows, top) / max(images_per_s(loads[first][0], top), 1e-9)
                lines.append(f"images/s at concurrency {top}, {n} captioners / {first}: {entry['vs_first']:.2f}x "
                             f"(target: within 10%); server exit status {code}, mismatches "
                             f"{sum(r['mismatches'] for r in rows)}, errors {sum(r['errors'] for r in rows)}")
        print("\n".join(lines))
        if cfg.out:
            from ..fileio import write_json

            write_json(cfg.out, figures, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def images_per_s(rows: List[dict], concurrency: int) -> float:
    return next(r for r in rows if r["concurrency"] == concurrency)["images_per_s"]


def serve_and_load(cfg: BenchServeConfig, llama: List[str], folder: str, expected: str, count: int, work: str,
                   log) -> tuple:
    """`serve` in a child process with the checkpoint under `count` names, the load test spread
    over them, SIGTERM: (the load test's rows, the server's exit status)."""
    from .loadtest import LoadTestConfig, load_test

    names = [f"c{i}" for i in range(count)] if count > 1 else []
    served = list(llama)
    if names:
        at = served.index("--checkpoint") + 1
        served[at] = ",".join(f"{n}={served[at]}" for n in names)
    url_file = os.path.join(work, f"url-{count}")
    server = subprocess.Popen([sys.executable, "-m", "llama_caption", "serve", *served, "--port", "0",
                               "--url_file", url_file, "--max_batch", str(cfg.max_batch), "--decoder", cfg.decoder,
                               "--max_wait_ms", str(cfg.max_wait_ms), "--max_queue", str(max(256, 2 * max(cfg.concurrency)))])
    try:
        url = wait_for_url(url_file, server)
        if names:
            log(f"{count} captioners over one LLaMA: {', '.join(names)}")
        rows = load_test(LoadTestConfig(url=url, images=folder, concurrency=cfg.concurrency, requests=cfg.requests,
                                        expected=expected, models=names), log)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    return rows, code


def load_figures(cfg: BenchServeConfig, offline: dict, rows: List[dict], code: int, lines: List[str]) -> dict:
    """The three ratios the server is held to (and its exit status), added to `lines`."""
    by_c = {r["concurrency"]: r for r in rows}
    figures = {"load": rows, "server_exit": code}
    lo, hi = min(by_c), max(by_c)
    if lo != hi and by_c[lo]["images_per_s"]:
        figures["scaling"] = by_c[hi]["images_per_s"] / by_c[lo]["images_per_s"]
        lines.append(f"images/s at concurrency {hi} / at {lo}: {figures['scaling']:.2f}x (target >= 8)")
    figures["vs_offline"] = by_c[hi]["images_per_s"] / offline["batch_images_per_s"]
    lines.append(f"images/s at concurrency {hi} / offline at batch {cfg.max_batch}: {figures['vs_offline']:.0%} (target >= 70%)")
    figures["p50_vs_single"] = by_c[lo]["p50_s"] / offline["single_s"]
    lines.append(f"p50 at concurrency {lo} / one offline caption: {figures['p50_vs_single']:.2f}x (target <= 1.2)")
    lines.append(f"server exit status after SIGTERM: {code}; mismatches against `caption`: "
                 f"{sum(r['mismatches'] for r in rows)}; errors: {sum(r['errors'] for r in rows)}")
    return figures

main = command(BenchServeConfig, run, "Benchmark the caption server against offline captioning (load test at several concurrencies).")
