"""A training run folder and our own checkpoints: only the trainable weights, never LLaMA or CLIP.

    RUN/config.json                                  the flags of the run
    RUN/metrics.jsonl, RUN/loss_curve.png            one JSON object per logged step; the curve
    RUN/checkpoints/step-0001000/projection.safetensors   weights + CaptionerSpec + flags (metadata)
                                 trainer.safetensors      optimizer tensors, RNG state
                                 trainer.json             step, epoch, scheduler, param groups
    RUN/checkpoints/latest                           the newest complete checkpoint's name

A checkpoint folder is filled under a temporary name and renamed when complete; `latest` is
rewritten atomically after that, so a crash at any moment leaves the previous one usable.
A folder that holds a run is only continued (--resume), never started over. `find_checkpoint`
finds the checkpoint of a run folder; opening.open_captioner builds a trained captioner from it.
"""

import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from .captioner import PROJECTION_FILE, CaptionerSpec, save_projection
from .captioner import check_same_llama, load_projection  # noqa: F401 (training.py calls them as runs.X)
from .errors import UserError
from .fileio import atomic_path, write_text


def checkpoints_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def latest_name(out_dir: str) -> Optional[str]:
    path = os.path.join(checkpoints_dir(out_dir), "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def save_checkpoint(out_dir: str, step: int, projection_state: Dict[str, torch.Tensor], captioner: CaptionerSpec,
                    flags: dict, optimizer_state: dict, trainer: dict, keep_last: int = 3) -> str:
    root = checkpoints_dir(out_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
    save_projection(os.path.join(tmp, PROJECTION_FILE), projection_state, captioner, flags)
    tensors = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng_cuda"] = torch.cuda.get_rng_state()
    for idx, st in optimizer_state["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = val.detach().cpu().contiguous()
    save_file(tensors, os.path.join(tmp, "trainer.safetensors"))
    with open(os.path.join(tmp, "trainer.json"), "w") as f:
        json.dump(dict(trainer, step=step, config=flags, param_groups=optimizer_state["param_groups"]), f, indent=1)
    final = os.path.join(root, name)
    if os.path.exists(final):  # the same step saved again (e.g. at the end of a resumed epoch)
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text(os.path.join(root, "latest"), name + "\n")
    prune(root, name, keep_last)
    return final


def prune(root: str, latest: str, keep_last: int) -> None:
    """Keep the `keep_last` newest checkpoints; the one `latest` names is never deleted."""
    if keep_last <= 0:
        return
    older = sorted(d for d in os.listdir(root) if d.startswith("step-") and d != latest)
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def find_checkpoint(path: str, flag: str = "--checkpoint") -> str:
    """A checkpoint folder from a run folder (its latest), a checkpoints/ folder, itself, or its
    projection file."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path} does not exist: give a run folder (RUN/checkpoints/latest) or a checkpoint folder")
    if os.path.basename(path) == PROJECTION_FILE and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    for candidate in (os.path.join(path, "checkpoints", "latest"), os.path.join(path, "latest")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                name = f.read().strip()
            return os.path.join(os.path.dirname(candidate), name)
    if os.path.isfile(os.path.join(path, PROJECTION_FILE)):
        return path
    raise UserError(f"{flag} {path}: no checkpoint there (a run folder holds checkpoints/latest, a checkpoint folder "
                    f"{PROJECTION_FILE})")


def load_trainer_state(ckpt: str) -> Tuple[dict, dict, Dict[str, torch.Tensor]]:
    """(trainer.json, the optimizer's state dict, the RNG tensors) of a checkpoint folder."""
    jpath, tpath = os.path.join(ckpt, "trainer.json"), os.path.join(ckpt, "trainer.safetensors")
    if not (os.path.isfile(jpath) and os.path.isfile(tpath)):
        raise UserError(f"{ckpt} lacks trainer.json / trainer.safetensors: it cannot be resumed")
    with open(jpath) as f:
        trainer = json.load(f)
    tensors = load_file(tpath)
    state: Dict[int, dict] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    rng = {k: v for k, v in tensors.items() if k.startswith("rng_")}
    return trainer, {"state": state, "param_groups": trainer["param_groups"]}, rng


def holds_run(out_dir: str) -> Optional[str]:
    """What in `out_dir` shows that a run reached a checkpoint there (None: nothing)."""
    name = latest_name(out_dir)
    if name:
        return f"a run at {name}"
    if os.path.isdir(checkpoints_dir(out_dir)) and any(d.startswith("step-") for d in os.listdir(checkpoints_dir(out_dir))):
        return "checkpoints"
    return None


def check_fresh(out_dir: str, log=print) -> None:
    """A new run may not start in a folder that holds one: its files would be overwritten. A start
    that failed before its first checkpoint (config.json, perhaps metrics.jsonl, nothing to
    resume) is started over."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file: name a folder for the run")
    found = os.path.isdir(out_dir) and holds_run(out_dir)
    if found:
        raise UserError(f"--out_dir {out_dir} already holds {found}: add --resume to continue it, "
                        f"or pick a new --out_dir (nothing was changed)")
    if any(os.path.isfile(os.path.join(out_dir, f)) for f in ("config.json", "metrics.jsonl")):
        log(f"--out_dir {out_dir} holds a run that stopped before its first checkpoint: it is started over")


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and the loss-curve PNG, written by rank 0; each
    row also goes to the `dashboard` (dashboard.py) when there is one."""

    def __init__(self, out_dir: str, enabled: bool, resume_step: Optional[int], dashboard=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.png = os.path.join(out_dir, "loss_curve.png")
        self.enabled = enabled
        self.dashboard = dashboard if enabled else None
        if enabled and os.path.isfile(self.path):
            # Lines the interrupted run wrote after its checkpoint (all, for a new run) are about to be redone.
            with open(self.path) as f:
                kept = [l for l in f if l.strip() and resume_step is not None and json.loads(l).get("step", 0) <= resume_step]
            write_text(self.path, "".join(kept))

    def write(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.dashboard is not None:
            self.dashboard.write(row)

    def close(self) -> None:
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None

    def plot(self):
        if not self.enabled or not os.path.isfile(self.path):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.path) as f:
            rows = [json.loads(l) for l in f if l.strip()]
        scst = any("reward" in r for r in rows)  # SCST: the reward and validation CIDEr-D
        train_key, val_key = ("reward", "val_cider") if scst else ("loss", "val_loss")
        train = [(r["step"], r[train_key]) for r in rows if train_key in r]
        val = [(r["step"], r[val_key]) for r in rows if val_key in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train), label="mean reward of the samples" if scst else "train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="validation CIDEr-D, greedy" if scst else "validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("CIDEr-D" if scst else "cross-entropy per caption token")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(self.png) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
