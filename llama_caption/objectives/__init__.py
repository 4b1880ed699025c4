"""Training objectives: what an optimizer step maximises and what validation reports.

The loop (training.py) calls an `Objective` and knows none of them by name. An objective owns
its caption mode (which captions an epoch gives each image), its flag checks, its step (batches
in, one optimizer update out) and its validation. `OBJECTIVES` maps each `--objective` to its
class (`register` adds one); `check_objective` and `objective_for` are the only readers of
`cfg.objective`.

    xe.py     cross-entropy on the reference captions
    scst.py   self-critical sequence training on CIDEr-D (its maths: llama_caption/scst.py)
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Protocol

if TYPE_CHECKING:
    from ..training import TrainConfig, Trainer


@dataclass
class StepResult:
    """One optimizer step as the loop logs it."""

    loss: Optional[float]  # None: NaN/inf and skipped, or (samples 0) no rank had a sample
    samples: int  # in the global step, over every data-parallel rank
    extra: Dict[str, float] = field(default_factory=dict)  # logged beside the loss (SCST: reward, sample length)


class Objective(Protocol):
    captions: str  # the training split's caption mode (data.CAPTION_MODES)

    @staticmethod
    def check(cfg: "TrainConfig") -> None:
        """The flags it needs, beyond TrainConfig's own checks: UserError naming the flag."""

    @classmethod
    def from_config(cls, cfg: "TrainConfig") -> "Objective": ...

    def prepare(self, trainer: "Trainer", env) -> None:
        """Once the data is built, before the first step."""

    def step(self, trainer: "Trainer", micro_batches: List[dict], env, step: int) -> StepResult:
        """One optimizer step over this rank's micro-batches of global step `step` (0-based)."""

    def validate(self, trainer: "Trainer", env) -> Dict[str, float]:
        """The validation metrics logged after an epoch (named val_*)."""


OBJECTIVES: Dict[str, type] = {}


def register(name: str):
    """A class decorator: the objective `--objective NAME` trains with."""
    def add(cls):
        OBJECTIVES[name] = cls
        return cls
    return add


def check_objective(cfg: "TrainConfig") -> None:
    cfg.one_of("objective", OBJECTIVES)
    OBJECTIVES[cfg.objective].check(cfg)


def objective_for(cfg: "TrainConfig") -> Objective:
    return OBJECTIVES[cfg.objective].from_config(cfg)


from . import xe, scst  # noqa: E402,F401,I001  (registered on import, the default first)
