"""The offline demo: stand-in models and data made here, then the real scripts run on them.

    make demo                                  # = python -m llama_caption demo
    python -m llama_caption demo --scale small # the reduced demo the tests run

1. A synthetic COCO-format dataset (llama_caption.demo.shapes).
2. Stand-ins, cached between runs: a CLIP (the clip package's own class) trained contrastively
   on the training captions, checked zero-shot per attribute; a LLaMA (our model class)
   pretrained on the same captions and written in Meta's format with a sentencepiece tokenizer.
   `--images/--annotations` build them from any COCO-format captions dataset instead.
3. python -m llama_caption features, train, caption and evaluate, unchanged (SCST under torchrun,
   data-parallel), exactly as on COCO: with both stand-ins frozen, a projection learns by
   cross-entropy (the MLP and the transformer mapper, each in its own folder, on the same data),
   the better one by validation CIDEr is fine-tuned by SCST (CIDEr-D optimisation), and each
   captions val. Captions of the same phase are scored by one `evaluate` of both files: METEOR's
   Java start (about 10 s of the 12 s that scoring takes here) is paid once for the two.
4. A control run that captions every image from another image's features, and the attribute
   accuracy (shape, colour, background) of each.

On two cores or more, steps that do not depend on each other run side by side, sharing the cores
(cpu_plan: one thread each on two): the two stand-ins (each in a child process), the two
feature caches, the two cross-entropy runs and their captioning, the SCST captions and the
control; scoring and SCST run alone (SCST data-parallel on two processes). Each step's seconds are logged
and kept in the report (stage_seconds). ^C stops every step at once.

With `--images DIR --annotations FILE` the whole demo runs on that COCO-format dataset instead:
the stand-ins are built from it, and the validation images are `--val_images/--val_annotations`
or, without them, a held-out tenth of the given images (attribute accuracy is for the synthetic
set only).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ... import distributed
from ...config import Config, command, setting
from ...data import load_coco, open_rgb
from ...errors import UserError
from ...evaluation import METRIC_ORDER, metrics_path
from ...fileio import check_output_dir, write_json
from ..testing import build_tiny_clip, demo_layout
from ...vision import EncoderSpec, check_encoder_flags, import_clip
from .shapes import BACKGROUNDS, SHAPE_COLOURS, SHAPES, SYNONYMS, make_dataset
from .standins import build_llama, text_embeddings, train_clip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SCALES = {
    # train/val images, CLIP steps and learning rate, LLaMA steps, cross-entropy epochs, SCST
    # epochs and sampling temperature
    "full": dict(train=2000, val=200, image_size=32, clip_steps=800, clip_lr=2e-3, llama_steps=500, epochs=2,
                 batch_size=64, lr=4e-3, scst_epochs=1, scst_batch=16, scst_lr=1e-3, scst_temperature=0.5),
    "small": dict(train=300, val=50, image_size=32, clip_steps=250, clip_lr=1e-3, llama_steps=150, epochs=2,
                  batch_size=32, lr=2e-3, scst_epochs=1, scst_batch=16, scst_lr=1e-3, scst_temperature=0.5),
}
# The transformer mapper's size for the demo, and its cross-entropy learning rate (it trains
# better at a lower one than the MLP's).
PROJECTION_FLAGS = {"transformer": ["--mapper_width", 128, "--mapper_layers", 2]}
XE_LR = {"transformer": 1e-3}
LLAMA_PARAMS = dict(dim=128, n_layers=4, n_heads=4, multiple_of=64, norm_eps=1e-5)
CLIP_SETTINGS = dict(width=64, layers=2, patch=8, embed_dim=128, batch_size=128)


def stamp_ok(path: str, settings: dict) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == settings
    except (OSError, json.JSONDecodeError):
        return False


def preprocess_all(paths: List[str], resolution: int) -> torch.Tensor:
    tf = import_clip().clip._transform(resolution)
    return torch.stack([tf(open_rgb(p)) for p in paths])


# ---------------------------------------------------------------------------------------------
# Reading attributes back out of captions (for the synthetic dataset's accuracy figures).
# ---------------------------------------------------------------------------------------------

SHAPE_WORDS = {w.split()[0]: s for s, words in SYNONYMS.items() for w in words}
SHAPE_WORDS.update({"round": "circle", "box": "square", "three-sided": "triangle"})
COLOUR_WORDS = set(SHAPE_COLOURS) | set(BACKGROUNDS)


def parse_attributes(caption: str) -> Dict[str, Optional[str]]:
    """Shape, colour and background named by a caption: the colour word nearest before the
    shape word is the shape's colour, the other colour word the background."""
    words = re.findall(r"[a-z\-]+", caption.lower())
    shape_pos = next((i for i, w in enumerate(words) if w in SHAPE_WORDS), None)
    colours = [(i, w) for i, w in enumerate(words) if w in COLOUR_WORDS]
    out = {"shape": SHAPE_WORDS[words[shape_pos]] if shape_pos is not None else None, "colour": None, "background": None}
    if shape_pos is not None:
        before = [c for c in colours if c[0] < shape_pos]
        if before:
            out["colour"] = before[-1][1]
            colours.remove(before[-1])
    if colours:
        out["background"] = colours[0][1]
    return out


def attribute_accuracy(results: List[dict], truth: Dict[str, dict]) -> Dict[str, float]:
    hits = {"shape": 0, "colour": 0, "background": 0, "all three": 0}
    for r in results:
        got, true = parse_attributes(r["caption"]), truth[str(r["image_id"])]
        ok = [got[a] == true[a] for a in ("shape", "colour", "background")]
        for a, o in zip(("shape", "colour", "background"), ok):
            hits[a] += o
        hits["all three"] += all(ok)
    return {k: v / max(1, len(results)) for k, v in hits.items()}


@torch.no_grad()
def clip_zero_shot(model, images: torch.Tensor, truth: List[dict]) -> Dict[str, float]:
    """Per attribute: the image against its caption with that attribute set to each value."""
    img = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
    acc = {}
    for attr, values in (("shape", SHAPES), ("colour", SHAPE_COLOURS), ("background", BACKGROUNDS)):
        right = 0
        for i, t in enumerate(truth):
            cands = []
            for v in values:
                b = dict(t, **{attr: v})
                cands.append(f"a {b['size']} {b['colour']} {b['shape']} on a {b['background']} background")
            right += values[int((text_embeddings(model, cands) @ img[i]).argmax())] == t[attr]
        acc[attr] = right / len(truth)
    return acc


def captioned_records(images: str, annotations: str):
    recs = [r for r in load_coco(images, annotations) if r.captions and os.path.isfile(r.path)]
    if not recs:
        raise UserError(f"{annotations} has no captioned images under {images}")
    return recs


def clip_standin_stamp(paths: Dict[str, str], s: dict, images: str, annotations: str) -> tuple:
    """The stand-in CLIP's stamp file, the settings it must hold, and whether the cached CLIP
    matches them."""
    settings = {"scale": s, "clip": CLIP_SETTINGS, "images": os.path.abspath(images),
                "annotations": os.path.abspath(annotations)}
    stamp = os.path.join(paths["standins"], "clip_settings.json")
    return stamp, settings, stamp_ok(stamp, settings) and os.path.isfile(paths["clip"])


def build_clip_standin(paths: Dict[str, str], s: dict, log, images: str, annotations: str) -> None:
    """Train and save the stand-in CLIP unless the cached one matches the settings."""
    stamp, settings, cached = clip_standin_stamp(paths, s, images, annotations)
    if cached:
        log(f"stand-in CLIP: reusing {paths['clip']}")
        return
    recs = captioned_records(images, annotations)
    t0 = time.time()
    log(f"training the stand-in CLIP on {len(recs)} images ({s['clip_steps']} steps)...")
    pixels = preprocess_all([r.path for r in recs], s["image_size"])
    cs = CLIP_SETTINGS
    model = train_clip(pixels, [r.captions for r in recs], steps=s["clip_steps"], lr=s["clip_lr"],
                       batch_size=cs["batch_size"], width=cs["width"], layers=cs["layers"], patch=cs["patch"],
                       embed_dim=cs["embed_dim"], log=log)
    build_tiny_clip(paths["clip"], model=model)
    log(f"  CLIP stand-in saved as {paths['clip']} ({time.time() - t0:.0f} s)")
    if os.path.isdir(paths["features"]):  # the caches of the CLIP it replaces
        shutil.rmtree(paths["features"])
        log(f"  removed {paths['features']}: features of the previous stand-in CLIP")
    if os.path.isfile(paths["val_attrs"]) and images == paths["train_images"]:
        with open(paths["val_attrs"]) as f:
            truth = json.load(f)
        val = load_coco(paths["val_images"], paths["val_ann"])
        acc = clip_zero_shot(model, preprocess_all([r.path for r in val], s["image_size"]),
                             [truth[str(r.image_id)] for r in val])
        write_json(os.path.join(paths["standins"], "clip_zero_shot.json"), acc, indent=1)
        log("  CLIP stand-in zero-shot accuracy on val: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    write_json(stamp, settings)


def llama_standin_stamp(paths: Dict[str, str], s: dict, images: str, annotations: str) -> tuple:
    """The stand-in LLaMA's stamp file, the settings it must hold, and whether the cached
    LLaMA matches them."""
    settings = {"scale": s, "llama": LLAMA_PARAMS, "images": os.path.abspath(images),
                "annotations": os.path.abspath(annotations)}
    stamp = os.path.join(paths["standins"], "llama_settings.json")
    return stamp, settings, stamp_ok(stamp, settings) and os.path.isfile(os.path.join(paths["ckpt_dir"], "params.json"))


def build_llama_standin(paths: Dict[str, str], s: dict, log, images: str, annotations: str) -> None:
    """Pretrain and save the stand-in LLaMA unless the cached one matches the settings."""
    stamp, settings, cached = llama_standin_stamp(paths, s, images, annotations)
    if cached:
        log(f"stand-in LLaMA: reusing {paths['ckpt_dir']}")
        return
    recs = captioned_records(images, annotations)
    t0 = time.time()
    log(f"pretraining the stand-in LLaMA ({s['llama_steps']} steps)...")
    build_llama(paths["standins"], [r.captions for r in recs], LLAMA_PARAMS, vocab_size=256,
                steps=s["llama_steps"], log=log)
    log(f"  LLaMA stand-in saved in {paths['ckpt_dir']} (Meta's format) ({time.time() - t0:.0f} s)")
    write_json(stamp, settings)


def cpu_plan() -> tuple:
    """(slots, threads): how many commands the demo runs side by side, and the threads of each.

    The demo's models are so small that a process gains little from a second thread (and on a
    busy machine an OpenMP team of two can wait on a descheduled thread), while two
    single-threaded processes use two cores fully; so on two cores or more two commands run at
    once (the two cross-entropy runs, their captioning, the two feature caches, ...), with the
    cores shared between them. OMP_NUM_THREADS, when set, is the threads of each."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    slots = 2 if cores >= 2 else 1
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None
    return slots, max(1, threads or cores // slots)


def last_lines(text: str, n: int = 30) -> str:
    """The last n lines of captured stderr, progress bars reduced to their final state."""
    lines = [l.split("\r")[-1] for l in (text or "").splitlines()]
    return "\n".join([l for l in lines if l.strip()][-n:])


def launch(*args, log=print, quiet=False, nproc: int = 1, threads: Optional[int] = None,
           progress: bool = True) -> str:
    """Run one of the project's commands as a user would: `python -m llama_caption ...` for one
    process, under torchrun for several (nproc CPU processes; torchrun's own start costs about 5 s
    on two cores, which one process does not need).

    quiet: neither its output nor its progress bars are shown (only its errors); progress False:
    its output is shown when it ends, its progress bars not at all (another command is running)."""
    if nproc == 1:
        cmd = [sys.executable, *map(str, args)]
        log("$ python " + " ".join(map(str, args)))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               *map(str, args)]
        log(f"$ torchrun --nproc_per_node {nproc} " + " ".join(map(str, args)))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or cpu_plan()[1]), PYTHONWARNINGS="ignore")
    capture = quiet or not progress
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if capture else None, text=True)
    if proc.stdout and not quiet:
        log(proc.stdout.rstrip())
    if proc.returncode != 0:
        what = " ".join(map(str, args[:2])) if args[0] == "-m" else args[0]
        errors = [l for l in (proc.stderr or "").splitlines() if l.startswith("error: ")]
        if capture and not errors:
            log(last_lines(proc.stderr))
        raise UserError(f"{what} failed (exit {proc.returncode})" + (f": {errors[-1][7:]}" if errors else
                                                                     "; see its messages above"))
    return proc.stdout


class Jobs:
    """The demo's steps as named jobs with dependencies, run at most `slots` at a time in the
    order they were added (a job of width w takes w slots); each job is a function run in a
    thread of this process, which waits on its command or child process. Records each job's
    seconds; the first error is raised once the running jobs have ended."""

    def __init__(self, slots: int, log):
        self.slots, self.log = slots, log
        self.jobs: Dict[str, tuple] = {}
        self.seconds: Dict[str, float] = {}
        self.results: Dict[str, object] = {}

    def add(self, name: str, fn, after=(), width: int = 1) -> None:
        """A job that starts once the jobs `after` (those added before it) have ended."""
        self.jobs[name] = (fn, tuple(a for a in after if a in self.jobs), min(width, self.slots))

    def run(self) -> Dict[str, object]:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        waiting, running, error = list(self.jobs), {}, None
        with ThreadPoolExecutor(self.slots) as pool:
            while waiting or running:
                busy = sum(self.jobs[n][2] for n in running.values())
                for name in list(waiting) if error is None else []:
                    fn, after, width = self.jobs[name]
                    if all(a in self.results for a in after) and busy + width <= self.slots:
                        waiting.remove(name)
                        running[pool.submit(self._timed, name, fn)] = name
                        busy += width
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    name = running.pop(f)
                    try:
                        self.results[name] = f.result()
                    except BaseException as e:  # re-raised once the others have ended
                        error = error or e
        if error is not None:
            raise error
        return self.results

    def _timed(self, name: str, fn):
        t0 = time.time()
        out = fn()
        self.seconds[name] = time.time() - t0
        self.log(f"[{name}: {self.seconds[name]:.0f} s]")
        return out


def encoder_flags(cfg, paths: Dict[str, str]) -> List[str]:
    """The encoder every script is given: the user's (--clip_model, --clip_pretrained) or the stand-in CLIP."""
    if not cfg.clip_model:
        return ["--clip_model", paths["clip"]]
    return ["--clip_model", cfg.clip_model] + (["--clip_pretrained", cfg.clip_pretrained] if cfg.clip_pretrained else [])


def clipscore_flags(cfg, paths: Dict[str, str]) -> List[str]:
    """CLIP-S is computed with the encoder the demo trains on (the stand-in CLIP, or the user's):
    ViT-B/32 is not at hand offline, and the stand-in knows these images."""
    flags = encoder_flags(cfg, paths)
    return ["--clipscore_model", flags[1]] + (["--clipscore_pretrained", flags[3]] if len(flags) > 2 else [])


def features_dir(cfg, paths: Dict[str, str]) -> str:
    """The stand-in CLIP's caches in features/, another encoder's in features-<its identity's hash>/."""
    if not cfg.clip_model:
        return paths["features"]
    identity = EncoderSpec.of(cfg.clip_model, pretrained=cfg.clip_pretrained).identity
    return paths["features"] + "-" + hashlib.sha256(identity.encode()).hexdigest()[:10]


def features(paths: Dict[str, str], encoder: List[str], folder: str, split: str, log=print, **run) -> str:
    """The feature cache of one split (the features command; it only checks a complete one)."""
    out = os.path.join(folder, split)
    launch("-m", "llama_caption", "features", *encoder, "--images", paths[f"{split}_images"],
             "--annotations", paths[f"{split}_ann"], "--out", out, "--num_workers", 0,
             "--batch_size", 256, log=log, quiet=True, **run)
    return out


@dataclass
class DemoConfig(Config):
    scale: str = setting("full", "full (the README's figures) or small (the reduced demo the tests run).")
    root: str = setting("demo_runs", "where data, stand-ins and runs are kept (reused by later runs; each run gets a new folder).")
    images: Optional[str] = setting(None, "build the stand-in models from this COCO-format images folder instead of the synthetic one.")
    annotations: Optional[str] = setting(None, "the captions JSON that goes with --images.")
    clip_model: Optional[str] = setting(None, "an image encoder of your own instead of the stand-in CLIP (as in training: a `clip` file or open_clip:ARCH).")
    clip_pretrained: Optional[str] = setting(None, "with --clip_model open_clip:ARCH: its weights file or tag.")
    val_images: Optional[str] = setting(None, "with --images: the validation images (default: a held-out tenth of --images).")
    val_annotations: Optional[str] = setting(None, "the captions JSON that goes with --val_images.")
    projections: List[str] = setting(("mlp", "transformer"), "the projections trained by cross-entropy and compared; the best goes on to SCST.")
    scst_epochs: Optional[int] = setting(None, "SCST epochs after cross-entropy (default: the scale's, 1; 0: none).")

    def check(self) -> None:
        self.one_of("scale", SCALES)
        if (self.images is None) != (self.annotations is None):
            raise UserError("--images and --annotations go together")
        if (self.val_images is None) != (self.val_annotations is None):
            raise UserError("--val_images and --val_annotations go together")
        if self.val_images and not self.images:
            raise UserError("--val_images goes with --images (the synthetic set has its own validation split)")
        if not self.projections:
            raise UserError("--projections needs at least one of mlp, linear, transformer")
        for p in self.projections:
            if p not in ("mlp", "linear", "transformer"):
                raise UserError(f"--projections: {p!r} is not one of mlp, linear, transformer")
        self.at_least(0, "scst_epochs")
        if self.clip_model:
            check_encoder_flags(self.clip_model, self.clip_pretrained)
        elif self.clip_pretrained:
            raise UserError("--clip_pretrained goes with --clip_model")


def new_run_folder(runs: str) -> str:
    """runs/001, runs/002, ...: a demo run never writes over an earlier one."""
    os.makedirs(runs, exist_ok=True)
    taken = [int(d) for d in os.listdir(runs) if d.isdigit()]
    return os.path.join(runs, f"{max(taken, default=0) + 1:03d}")


def held_out_split(images: str, annotations: str, out: str, log) -> Dict[str, str]:
    """A COCO captions file cut in two: every tenth image (by id, at least one) for validation.
    Writes out/train.json and out/val.json (the original entries, filtered)."""
    data = json.load(open(annotations, encoding="utf-8"))
    ids = sorted(captioned_records(images, annotations), key=lambda r: r.image_id)
    val_ids = {r.image_id for r in ids[::10]}
    if len(val_ids) == len(ids):
        raise UserError(f"{annotations} has {len(ids)} captioned image(s): too few to hold some out; give --val_images")
    for name, keep in (("train", lambda i: i not in val_ids), ("val", lambda i: i in val_ids)):
        part = dict(data, images=[im for im in data["images"] if keep(im["id"])],
                    annotations=[a for a in data["annotations"] if keep(a["image_id"])])
        write_json(os.path.join(out, f"{name}.json"), part)
    log(f"held out {len(val_ids)} of {len(ids)} images of {annotations} for validation")
    return {"train": os.path.join(out, "train.json"), "val": os.path.join(out, "val.json")}


def prepare_data(cfg: DemoConfig, s: dict, log) -> Dict[str, str]:
    """The layout of this demo: the synthetic set (drawn once), or the user's dataset with its own
    stand-ins, feature caches and runs under root/<scale>-<hash of its paths>."""
    if not cfg.images:
        paths = demo_layout(cfg.root, cfg.scale)
        make_dataset(paths["data"], s["train"], s["val"], seed=0, image_size=s["image_size"])
        log(f"dataset: {s['train']} train and {s['val']} val images in COCO's layout under {paths['data']}")
        return paths
    given = [os.path.abspath(p) if p else None for p in (cfg.images, cfg.annotations, cfg.val_images, cfg.val_annotations)]
    key = hashlib.sha256(json.dumps(given).encode()).hexdigest()[:10]
    paths = demo_layout(cfg.root, f"{cfg.scale}-{key}")
    paths.update(train_images=cfg.images, val_images=cfg.val_images or cfg.images, val_attrs="")
    if cfg.val_images:
        paths.update(train_ann=cfg.annotations, val_ann=cfg.val_annotations)
    else:
        split = held_out_split(cfg.images, cfg.annotations, paths["data"], log)
        paths.update(train_ann=split["train"], val_ann=split["val"])
    check_split_sizes(cfg, s, paths)
    log(f"dataset: {cfg.images} ({paths['train_ann']}), validation {paths['val_images']} ({paths['val_ann']}); "
        f"stand-ins and runs under {paths['root']}")
    return paths


def check_split_sizes(cfg: DemoConfig, s: dict, paths: Dict[str, str]) -> None:
    """Before minutes of stand-in building: enough captions for one training batch (and images
    for one SCST batch), and two validation images for the shuffled control."""
    val = [r for r in load_coco(paths["val_images"], paths["val_ann"]) if os.path.isfile(r.path)]
    if len(val) < 2:
        raise UserError(f"{paths['val_ann']}: {len(val)} validation image(s) found under {paths['val_images']}: the demo "
                        f"needs at least 2 (the control captions each from another's features)")
    train = captioned_records(paths["train_images"], paths["train_ann"])
    n_caps = sum(len(r.captions) for r in train)
    scst = (s["scst_epochs"] if cfg.scst_epochs is None else cfg.scst_epochs) > 0
    need_images = s["scst_batch"] if scst else 1
    if n_caps < s["batch_size"] or len(train) < need_images:
        raise UserError(f"{paths['train_ann']}: {len(train)} captioned training image(s) with {n_caps} caption(s); the "
                        f"{cfg.scale} demo trains on batches of {s['batch_size']} captions" +
                        (f" and SCST on {need_images} images" if scst else "") + ": give a larger --images set")


def caption(paths, checkpoint: str, name: str, folder: str, log, extra=(), **run) -> str:
    """The caption command on the validation images, unscored (`score` scores several results
    files in one process: METEOR's Java start, most of a scoring, is paid once); the results path."""
    res = os.path.join(folder, f"{name}.json")
    launch("-m", "llama_caption", "caption", "--ckpt_dir", paths["ckpt_dir"], "--tokenizer_path", paths["tokenizer"],
           "--checkpoint", checkpoint, "--images", paths["val_images"], "--annotations", paths["val_ann"], "--out", res,
           "--batch_size", 50, "--num_workers", 0, "--evaluate", False, *extra, log=log, **run)
    return res


def score(paths, results: List[str], scoring: List[str], log, **run) -> Dict[str, dict]:
    """The evaluate command on results files of the validation images (metrics written beside
    each); each file's results and metrics."""
    launch("-m", "llama_caption", "evaluate", *results, "--annotations", paths["val_ann"], "--images",
           paths["val_images"], *scoring, log=log, **run)
    out = {}
    for res in results:
        with open(res) as f, open(metrics_path(res)) as m:
            out[res] = {"results": json.load(f), "metrics": json.load(m)["metrics"]}
    return out


def print_flush(message: str) -> None:
    print(message, flush=True)


STANDINS = {"CLIP": (clip_standin_stamp, build_clip_standin), "LLaMA": (llama_standin_stamp, build_llama_standin)}


def standin_process(which: str, paths: Dict[str, str], s: dict, images: str, annotations: str, threads: int) -> None:
    """Build one stand-in (CLIP or LLaMA) in a child process: the two are built side by side."""
    import contextlib

    torch.set_num_threads(threads)
    model_parallel = which == "LLaMA"  # our LLaMA class needs the (size 1) model-parallel group
    with distributed.session(mp_size=1, device="cpu", quiet=True) if model_parallel else contextlib.nullcontext():
        STANDINS[which][1](paths, s, print_flush, images, annotations)


def build_standin(which: str, paths: Dict[str, str], s: dict, log, threads: int) -> None:
    """A stand-in from the cache, or built in a child process (^C stops it at once)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    stamp_of, build = STANDINS[which]
    if stamp_of(paths, s, paths["train_images"], paths["train_ann"])[2]:
        build(paths, s, log, paths["train_images"], paths["train_ann"])  # says it reuses it
        return
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        child.submit(standin_process, which, paths, s, paths["train_images"], paths["train_ann"], threads).result()


def run_demo(cfg: DemoConfig, log=print) -> dict:
    check_output_dir(cfg.root, "--root")
    s = SCALES[cfg.scale]
    t_start = time.time()
    lock = threading.Lock()

    def say(message: str) -> None:  # jobs run side by side: one message at a time
        with lock:
            log(message)
            sys.stdout.flush()

    paths = prepare_data(cfg, s, say)
    slots, threads = cpu_plan()
    alone = dict(progress=slots == 1)  # progress bars only when one command runs at a time
    jobs = Jobs(slots, say)
    encoder, feats = encoder_flags(cfg, paths), features_dir(cfg, paths)
    scoring = clipscore_flags(cfg, paths)
    run = new_run_folder(paths["runs"])
    say(f"this run: {run}; up to {slots} command(s) at a time, {threads} thread(s) each" +
        ("; a command's progress bars are shown when it runs alone" if slots > 1 else ""))

    # The two stand-ins side by side; the feature caches as soon as the CLIP is there.
    jobs.add("stand-in LLaMA", lambda: build_standin("LLaMA", paths, s, say, threads))
    if not cfg.clip_model:
        jobs.add("stand-in CLIP", lambda: build_standin("CLIP", paths, s, say, threads))
    for split in ("train", "val"):
        jobs.add(f"features {split}", lambda split=split: features(paths, encoder, feats, split, say, threads=threads),
                 after=["stand-in CLIP"])
    common = ["--ckpt_dir", paths["ckpt_dir"], "--tokenizer_path", paths["tokenizer"], *encoder,
              "--train_images", paths["train_images"], "--train_annotations", paths["train_ann"],
              "--features", os.path.join(feats, "train"), "--val_images", paths["val_images"],
              "--val_annotations", paths["val_ann"], "--val_features", os.path.join(feats, "val"), "--prefix_len", 4,
              "--num_workers", 0, "--log_every", 20, "--save_every", 100000]
    ready = ["stand-in LLaMA", "features train", "features val"]

    # Cross-entropy with each projection side by side, each captioning val when it is done.
    for proj in cfg.projections:
        folder = os.path.join(run, f"xe-{proj}")
        jobs.add(f"xe-{proj}", lambda proj=proj, folder=folder: launch(
            "-m", "llama_caption", "train", *common, "--out_dir", folder, "--projection", proj, "--epochs", s["epochs"],
            "--batch_size", s["batch_size"], "--lr", XE_LR.get(proj, s["lr"]), "--warmup_steps", 50,
            *PROJECTION_FLAGS.get(proj, []), log=say, threads=threads, **alone), after=ready)
        jobs.add(f"caption xe-{proj}", lambda folder=folder: caption(paths, folder, "captions", folder, say,
                                                                     ["--gallery", 24], threads=threads, **alone),
                 after=[f"xe-{proj}"])
    xe_captions = [f"caption xe-{p}" for p in cfg.projections]
    jobs.add("score xe", lambda: score(paths, [jobs.results[c] for c in xe_captions], scoring, say, threads=threads,
                                       **alone), after=xe_captions)

    def stage(name: str) -> dict:
        """A stage's results and metrics, from the scoring job that scored its captions."""
        scored_by = "score xe" if name.startswith("xe-") else "score final"
        return jobs.results[scored_by][jobs.results[f"caption {name}"]]

    def best_projection() -> str:
        return max(cfg.projections, key=lambda p: stage(f"xe-{p}")["metrics"]["CIDEr"])

    # SCST from the better one, alone, data-parallel over the slots; then its captions and the
    # control side by side.
    scst_epochs = s["scst_epochs"] if cfg.scst_epochs is None else cfg.scst_epochs

    def final() -> str:
        return os.path.join(run, "scst" if scst_epochs else f"xe-{best_projection()}")

    def scst_job():
        best = best_projection()
        launch("-m", "llama_caption", "train", *common, "--out_dir", final(), "--projection", best,
                 *PROJECTION_FLAGS.get(best, []),
                 "--objective", "scst", "--init_from", os.path.join(run, f"xe-{best}"), "--scst_samples", 5,
                 "--scst_temperature", s["scst_temperature"], "--epochs", scst_epochs, "--batch_size", s["scst_batch"],
                 "--lr", s["scst_lr"], "--warmup_steps", 0, "--max_caption_len", 20, log=say, nproc=slots,
                 threads=threads)

    final_captions = ["caption control"]
    if scst_epochs:
        jobs.add("scst", scst_job, after=["score xe"], width=slots)
        jobs.add("caption scst", lambda: caption(paths, final(), "captions", final(), say, ["--gallery", 24],
                                                 threads=threads, **alone), after=["scst"])
        final_captions.insert(0, "caption scst")
    jobs.add("caption control", lambda: caption(paths, final(), "control", final(), say,
                                                ["--gallery", 0, "--control_shuffle", "True"],
                                                threads=threads, **alone), after=["scst", "score xe"])
    jobs.add("score final", lambda: score(paths, [jobs.results[c] for c in final_captions], scoring, say,
                                          threads=threads, **alone), after=final_captions)
    jobs.run()

    best = best_projection()
    stages = {f"xe-{p}": stage(f"xe-{p}") for p in cfg.projections}
    if scst_epochs:
        stages["scst"] = stage("scst")
    stages["control"] = stage("control")
    truth = None
    if paths["val_attrs"] and os.path.isfile(paths["val_attrs"]):
        with open(paths["val_attrs"]) as f:
            truth = json.load(f)
    report = {"best_projection": best, "final": final(), "stages": {}, "slots": slots, "threads": threads,
              # relative to this report's folder: a copied or moved demo_runs/ still serves
              "serve": {k: os.path.relpath(v, run) for k, v in dict(
                  ckpt_dir=paths["ckpt_dir"], tokenizer_path=paths["tokenizer"], checkpoint=final(),
                  images=paths["val_images"], annotations=paths["val_ann"],
                  **({} if cfg.clip_model else {"clip_model": paths["clip"]})).items()},
              "stage_seconds": {k: round(v, 1) for k, v in jobs.seconds.items()}}
    for name, out in stages.items():
        report["stages"][name] = {"metrics": out["metrics"]}
        if truth:
            report["stages"][name]["attributes"] = attribute_accuracy(out["results"], truth)
    report["seconds"] = time.time() - t_start
    zs = os.path.join(paths["standins"], "clip_zero_shot.json")
    if os.path.isfile(zs) and not cfg.clip_model and truth:
        with open(zs) as f:
            report["clip_zero_shot"] = json.load(f)
    write_json(os.path.join(run, "demo_report.json"), report, indent=1)
    print_report(report, stages, truth, run)
    return report


def clip_s_line(report: dict, final: str) -> Optional[str]:
    """CLIP-S (x100, by the demo's own CLIP) of the final captions beside the shuffled control's,
    which sees other images: the gap is how much the captions fit their own image."""
    clip_s = {k: v["metrics"]["CLIP-S"] * 100 for k, v in report["stages"].items() if "CLIP-S" in v["metrics"]}
    if final not in clip_s:
        return None
    line = f"CLIP-S (the demo's CLIP): {STAGE_LABELS.get(final, final)} {clip_s[final]:.1f}"
    if "control" in clip_s:
        line += f", shuffled control {clip_s['control']:.1f} ({clip_s[final] - clip_s['control']:+.1f})"
    return line


STAGE_LABELS = {"xe-mlp": "cross-entropy, MLP", "xe-linear": "cross-entropy, linear",
                "xe-transformer": "cross-entropy, mapper", "scst": "SCST", "control": "shuffled control"}


def newest_demo_run(root: str = "demo_runs") -> Dict[str, str]:
    """The newest finished demo run under `root`: its LLaMA, tokenizer, final checkpoint and
    validation images (what `make serve` and `bench-serve` use)."""
    import glob

    reports = [p for p in glob.glob(os.path.join(root, "*", "runs", "*", "demo_report.json"))]
    for path in sorted(reports, key=os.path.getmtime, reverse=True):
        try:
            with open(path, encoding="utf-8") as f:
                found = json.load(f).get("serve")
        except (OSError, ValueError):
            continue
        if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
            continue
        found = {k: os.path.normpath(os.path.join(os.path.dirname(path), v)) for k, v in found.items()}
        if all(os.path.exists(found.get(k) or "") for k in ("ckpt_dir", "checkpoint", "images")):
            return found
    raise UserError(f"no finished demo run under {root}/ (with its models still there): run `make demo` first")


def print_report(report, stages, truth, run: str) -> None:
    print("\n" + "=" * 78)
    print("llama_caption demo: val images captioned by the trained projections")
    first = next(iter(stages.values()))["metrics"]
    names = [m for m in METRIC_ORDER if m in first]
    print(f"\n{'':24}" + "".join(f"{m:>10}" for m in names))
    for k in stages:
        label = STAGE_LABELS.get(k, k) + (f" (from {report['best_projection']})" if k == "scst" else "")
        values = report["stages"][k]["metrics"]
        print(f"{label:24}" + "".join(f"{values[m] * 100:10.2f}" if m in values else f"{'-':>10}" for m in names))
    if truth:
        print("\nattribute accuracy        shape   colour  background  all three")
        for k in stages:
            a = report["stages"][k]["attributes"]
            print(f"{STAGE_LABELS.get(k, k):24}{a['shape']:7.0%}{a['colour']:9.0%}{a['background']:12.0%}"
                  f"{a['all three']:11.0%}")
    if "clip_zero_shot" in report:
        z = report["clip_zero_shot"]
        print(f"CLIP stand-in zero-shot: shape {z['shape']:.0%}, colour {z['colour']:.0%}, background {z['background']:.0%}")
    final = "scst" if "scst" in stages else f"xe-{report['best_projection']}"
    print("\nexamples (generated caption" + (" | true shape, colour, background):" if truth else "):"))
    for r in stages[final]["results"][:6]:
        if truth:
            t = truth[str(r["image_id"])]
            print(f"  {r['caption']:50} | {t['size']} {t['colour']} {t['shape']}, {t['background']} background")
        else:
            print(f"  {r['caption']}")
    cider = {k: v["metrics"]["CIDEr"] * 100 for k, v in report["stages"].items()}
    xe = cider[f"xe-{report['best_projection']}"]
    line = f"\nCIDEr: cross-entropy ({report['best_projection']}) {xe:.1f}"
    if "scst" in cider:
        line += f", after SCST {cider['scst']:.1f} ({cider['scst'] - xe:+.1f})"
    print(line + f", shuffled control {cider['control']:.1f}; demo took {report['seconds']:.0f} s")
    clip_line = clip_s_line(report, final)
    if clip_line:
        print(clip_line)
    folder = report["final"]
    print(f"gallery: {os.path.join(folder, 'captions.gallery.html')}")
    print(f"curves: {os.path.join(folder, 'loss_curve.png')}")
    print(f"report: {os.path.join(run, 'demo_report.json')}")


main = command(DemoConfig, run_demo, "Build the stand-ins (cached), train the projection with the real scripts, caption val.")
