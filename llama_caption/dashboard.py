"""A training dashboard, TensorBoard or Weights & Biases, beside metrics.jsonl and the PNG curve.

    torchrun ... -m llama_caption train ... --report_to tensorboard   # tensorboard --logdir RUN/tensorboard
    WANDB_MODE=offline torchrun ... -m llama_caption train ... --report_to wandb   # wandb sync RUN/wandb/offline-run-*

Every row of metrics.jsonl is logged as scalars at its optimizer step: train/loss, train/lr,
train/samples_per_s (SCST: train/reward, train/sample_len), and per epoch val/loss (SCST:
val/cider); after each epoch, a few greedy captions of validation images (training images when
there is no validation split) as text, with their references. Rank 0 alone writes. A resumed run
drops what the interrupted one logged after its checkpoint, as metrics.jsonl does (TensorBoard's
purge_step; W&B continues the run of the same folder).
"""

import hashlib
import importlib.util
import os
from typing import List, Optional

from .errors import UserError

REPORTERS = ("none", "tensorboard", "wandb")


def check_reporter(name: str) -> None:
    """The package a dashboard needs, checked with the flags (before any work)."""
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    if name == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("--report_to wandb needs the wandb package: pip install wandb (WANDB_MODE=offline runs "
                        "without a network or an account)")


def tag(key: str) -> str:
    """metrics.jsonl's names as dashboard tags: val_loss -> val/loss, loss -> train/loss."""
    return "val/" + key[4:] if key.startswith("val_") else "train/" + key


def captions_markdown(rows: List[tuple]) -> str:
    """(image id, caption, references) rows as a Markdown table (TensorBoard's text panel)."""
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| image | caption | references |", "|---|---|---|"]
    lines += [f"| {i} | {cell(c)} | {cell(' / '.join(refs))} |" for i, c, refs in rows]
    return "\n".join(lines)


class TensorBoard:
    def __init__(self, out_dir: str, config: dict, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = os.path.join(out_dir, "tensorboard")
        # purge_step: events the interrupted run wrote after its checkpoint are dropped.
        self.writer = SummaryWriter(self.folder, purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "\n".join(f"    {k}: {v!r}" for k, v in config.items()), 0)

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def captions(self, step: int, rows: List[tuple]) -> None:
        self.writer.add_text("val/captions", captions_markdown(rows), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out_dir: str, config: dict, resume_step: Optional[int]):
        import wandb

        self.wandb = wandb
        folder = os.path.abspath(out_dir)
        # One W&B run per run folder: a resumed training run continues it.
        run_id = "llama-caption-" + hashlib.sha256(folder.encode()).hexdigest()[:12]
        self.folder = os.path.join(folder, "wandb")
        self.run = wandb.init(project="llama_caption", name=os.path.basename(folder), dir=folder, id=run_id,
                              resume="allow", config=config)

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def captions(self, step: int, rows: List[tuple]) -> None:
        table = self.wandb.Table(columns=["image", "caption", "references"],
                                 data=[[i, c, " / ".join(refs)] for i, c, refs in rows])
        self.run.log({"val/captions": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class Dashboard:
    """Rows of metrics.jsonl and sample captions to a TensorBoard or W&B writer."""

    def __init__(self, kind: str, out_dir: str, config: dict, resume_step: Optional[int]):
        self.sink = (TensorBoard if kind == "tensorboard" else WandB)(out_dir, config, resume_step)

    @property
    def folder(self) -> str:
        return self.sink.folder

    def write(self, row: dict) -> None:
        values = {tag(k): float(v) for k, v in row.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
        self.sink.scalars(row["step"], values)

    def captions(self, step: int, rows: List[tuple]) -> None:
        self.sink.captions(step, rows)

    def close(self) -> None:
        self.sink.close()


def open_dashboard(kind: str, out_dir: str, config: dict, resume_step: Optional[int], enabled: bool) -> Optional[Dashboard]:
    """The dashboard of rank 0 (None elsewhere, and for --report_to none)."""
    if kind == "none" or not enabled:
        return None
    return Dashboard(kind, out_dir, config, resume_step)
