"""A training run folder and our own checkpoints: only the trainable weights, never LLaMA or CLIP.

    RUN/config.json                                  the flags of the run
    RUN/metrics.jsonl, RUN/loss_curve.png            one JSON object per logged step; the curve
    RUN/checkpoints/step-0001000/projection.safetensors   weights + CaptionerSpec + flags (metadata)
                                 trainer.safetensors      optimizer tensors, RNG state
                                 trainer.json             step, epoch, scheduler, param groups
    RUN/checkpoints/latest                           the newest complete checkpoint's name

A checkpoint folder is filled under a temporary name and renamed when complete; `latest` is
rewritten atomically after that, so a crash at any moment leaves the previous one usable.
A folder that holds a run is only continued (--resume), never started over. `load_captioner`
builds a trained captioner (frozen LLaMA and CLIP included) from a run folder or a checkpoint.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from .captioner import (PROJECTION_FILE, Captioner, CaptionerSpec, check_encoder, check_window, load_projection,
                        save_projection)
from .config import setting
from .llama.checkpoint import LlamaCheckpoint, LlamaSettings, load_llama, open_checkpoint
from .llama.quantize import describe
from .llama.static_decode import MODES, make_decoder
from .errors import UserError
from .runtime import DTYPE_NAMES, resolve_dtype
from .fileio import atomic_path, write_text
from .vision import EncoderSpec, load_encoder


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
    """A checkpoint folder from a run folder (its latest), a checkpoints/ folder, or itself."""
    for candidate in (os.path.join(path, "checkpoints", "latest"), os.path.join(path, "latest")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                name = f.read().strip()
            return os.path.join(os.path.dirname(candidate), name)
    if os.path.isfile(os.path.join(path, PROJECTION_FILE)):
        return path
    raise UserError(f"{flag} {path}: no checkpoint there (expected RUN/checkpoints/latest or {PROJECTION_FILE})")


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


def check_same_llama(where: str, recorded_dir: Optional[str], llama: LlamaCheckpoint) -> None:
    """The LLaMA a projection was trained with (its folder, as its flags recorded it) against
    `llama`: when that folder still exists, another architecture (width, layers, heads,
    vocabulary) is refused. Two LLaMAs of the same shape are not told apart."""
    if not recorded_dir or not os.path.isdir(recorded_dir) or os.path.abspath(recorded_dir) == os.path.abspath(llama.folder):
        return
    if open_checkpoint(recorded_dir).architecture() != llama.architecture():
        raise UserError(f"{where} was trained with the LLaMA in {recorded_dir}, not the one in --ckpt_dir {llama.folder}: "
                        f"use the LLaMA it was trained with")


def load_captioner(checkpoint: str, llama: LlamaCheckpoint, tokenizer_path: Optional[str], device,
                   dtype=torch.float32, max_gen_len: int = 30, clip_model: Optional[str] = None,
                   clip_pretrained: Optional[str] = None, decoder: str = "eager", batch_size: int = 32,
                   pack_weights: bool = False, log=print, quantize: str = "none"):
    """A trained captioner from a training checkpoint, the frozen LLaMA (`llama`, opened) and CLIP.

    The encoder, projection and prefix come from the checkpoint's CaptionerSpec; `clip_model`
    is the path of the same CLIP file when it moved (its identity must match). `decoder` picks how
    greedy and sampled captions are decoded (static_decode.MODES); `pack_weights` packs the LLaMA's
    weights for oneDNN first (CPU); `quantize` quantizes its block weights (quantize.MODES).
    Returns (captioner, encoder, CaptionerSpec).
    """
    ckpt = find_checkpoint(checkpoint)
    weights, cfg, flags = load_projection(ckpt)
    window = check_window(cfg.prefix_len, max_gen_len, llama, "--max_gen_len")  # before anything is loaded
    spec = cfg.encoder
    if clip_model or clip_pretrained:  # the same encoder's files, moved: the identity must still match
        spec = EncoderSpec.of(clip_model or spec.clip_model, spec.feature_kind,
                              -2 if spec.clip_layer is None else spec.clip_layer, clip_pretrained or spec.pretrained)
    encoder = load_encoder(spec, device)
    known = cfg.prefix_len
    cfg = check_encoder(cfg, encoder, f"--checkpoint {ckpt}")
    if cfg.prefix_len != known:  # a first-format patch checkpoint: its patch count came from the encoder
        window = check_window(cfg.prefix_len, max_gen_len, llama, "--max_gen_len")
    if cfg.llama_dim != llama.args.dim:
        raise UserError(f"--checkpoint {ckpt} projects to LLaMA width {cfg.llama_dim} but {llama.folder} has width "
                        f"{llama.args.dim}: use the LLaMA it was trained with")
    check_same_llama(f"--checkpoint {ckpt}", flags.get("ckpt_dir"), llama)
    if quantize != "none" and decoder in ("compile", "cuda_graph"):
        raise UserError(f"--decoder {decoder} is not measured with --quantize {quantize}: use --decoder static or eager")
    trained = flags.get("quantize", "none")
    if trained != quantize:  # allowed: the projection only saw the LLaMA's activations
        log(f"--checkpoint {ckpt} was trained with the LLaMA at {describe(trained)}; captioning with it at "
            f"{describe(quantize)}")
    model, tokenizer = load_llama(llama, tokenizer_path, window, device=device, dtype=dtype, quantize=quantize)
    projection = cfg.new_projection()
    try:
        projection.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(f"{ckpt}: projection weights do not fit the stored config ({str(e).splitlines()[0]})") from None
    projection.to(device).eval()
    if pack_weights and decoder == "compile":  # torch.compile cannot trace the oneDNN-packed layers
        log("--decoder compile: LLaMA's weights are not packed for oneDNN (the compiled step uses the plain ones)")
    elif pack_weights and model.pack_weights():
        log("CPU decoding: LLaMA's weights packed for oneDNN (--pack_weights False to save the extra copy)")
    return Captioner(model, tokenizer, projection, cfg.style, make_decoder(model, decoder, batch_size)), encoder, cfg


@dataclass(kw_only=True)
class CaptionerSettings(LlamaSettings):
    """The flags of every command that captions with a trained run (`caption`, `serve`): the
    LLaMA (LlamaSettings), the checkpoint, where its CLIP moved to, precision and decoder.
    `load` builds the captioner from them."""

    checkpoint: str = setting(help="a training run folder (its latest checkpoint) or one checkpoint folder.")
    clip_model: Optional[str] = setting(None, "the CLIP file, when it moved since training (it must be the same model).")
    clip_pretrained: Optional[str] = setting(None, "the open_clip weights file, when it moved since training (the same weights).")
    dtype: str = setting("auto", "frozen LLaMA precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")
    decoder: str = setting("auto", "greedy/top-p decoder: auto (on a CPU: static; on CUDA: cuda_graph for caption on one GPU without --quantize, 2.5x eager at 7B on an H200, and eager with model parallelism, --quantize, beam search or in serve); eager; static (fixed-shape KV cache, batches padded to 1, 2, 4 ... 64 or --batch_size); compile (static through torch.compile); cuda_graph (static captured as CUDA graphs, CUDA only). Same captions in fp32; beam search is always eager.")
    pack_weights: bool = setting(True, "on a CPU, decode with a copy of LLaMA's weights packed for oneDNN (faster; one extra copy in memory). No effect on CUDA.")

    def check(self) -> None:
        super().check()
        self.one_of("dtype", DTYPE_NAMES)
        self.one_of("decoder", ("auto",) + MODES)

    def resolve_decoder(self, device: torch.device, beams: bool = False, mp_size: int = 1,
                        graphs: bool = True) -> None:
        """`auto`: the static decoder on a CPU and the CUDA-graph one on CUDA (the same captions,
        faster: docs/captioning.md); the eager one for beam search (`beams`), and on CUDA across
        model-parallel ranks (`mp_size`: collectives inside a graph, not measured), with --quantize
        (the graph decoders refuse quantized layers) or where CUDA graphs were not tried on a GPU
        (`graphs` False: the server, whose web threads run beside the decoding loop)."""
        if self.decoder == "auto":
            if beams:
                self.decoder = "eager"
            elif device.type != "cuda":
                self.decoder = "static"
            else:
                ok = graphs and mp_size == 1 and self.quantize == "none"
                self.decoder = "cuda_graph" if ok else "eager"
        if self.decoder == "cuda_graph" and device.type != "cuda":
            raise UserError("--decoder cuda_graph needs a CUDA device: use static or compile on the CPU")

    def load(self, device: torch.device, max_gen_len: int, batch_size: int, log=print):
        """(captioner, encoder, CaptionerSpec, dtype): the trained captioner on `device`, with the
        LLaMA opened once (`open()`) and the decoder resolved first."""
        dtype = resolve_dtype(self.dtype, device)
        captioner, encoder, cfg = load_captioner(self.checkpoint, self.open(), self.tokenizer_path, device, dtype,
                                                 max_gen_len, self.clip_model, self.clip_pretrained, self.decoder,
                                                 batch_size, self.pack_weights, log, self.quantize)
        return captioner, encoder, cfg, dtype


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
