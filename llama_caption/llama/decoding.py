"""Decoding settings, defined once, and the one function that decodes with them.

A setting is a field of `Decoding` with its default, limits, help and when results record it
(`limit`). From there come a command's flags (`flags`), a request's settings (`from_values`),
the checks and their messages, one per setting whichever command receives it (`check`), what a
results file records (`provenance`) and each rank's random generator (`generator`). `decode`
runs greedy decoding, top-p sampling or beam search with them, through the decoder asked for.
"""

import functools
import json
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..config import number, setting, shown
from ..errors import UserError
from .generation import beam_search, generate
from .model import Transformer

MAX_TEMPERATURE = 100.0
# Below this, sampling is greedy in all but name, and logits / temperature overflow float32 near
# 1e-38 (a crash inside torch.multinomial): such a temperature is refused rather than clamped.
MIN_TEMPERATURE = 1e-3
MAX_SEED = 2 ** 63 - 1  # what torch.Generator and numpy take


def limit(default, low, high, help: str, *, open_low: bool = False, recorded: str = "always",
          what: Optional[str] = None):
    """A Decoding field: values in [low, high] ((low, high] when `open_low`; high None: no upper
    limit), the flag's help, when results files record it (always, sampling, beams, or changed:
    when not the default, so that results files of before the setting still match) and, where
    the range alone would read oddly, how a message says it (`what`)."""
    return field(default=default, metadata=dict(low=low, high=high, open_low=open_low, help=help, recorded=recorded,
                                                what=what))


def span(kind: type, low, high, open_low: bool) -> str:
    if kind is int:
        return f"at least {low}" if high is None else f"between {low} and {high}"
    return f"in {'(' if open_low else '['}{low:g}, {high:g}]"


@dataclass(frozen=True)
class Decoding:
    """How sequences are decoded: greedy (temperature 0), top-p sampling, or beam search."""

    max_gen_len: int = limit(30, 1, None, "the most tokens generated per caption or completion (with the image prefix or the prompt, at most the LLaMA's context).")
    num_beams: int = limit(1, 1, None, "beam search with this many beams (1: greedy).")
    temperature: float = limit(0.0, 0.0, MAX_TEMPERATURE, "0 is greedy decoding; above 0, top-p sampling at this temperature.",
                               what=f"0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    top_p: float = limit(0.95, 0.0, 1.0, "nucleus-sampling threshold (used when temperature > 0), in (0, 1].",
                         open_low=True, recorded="sampling")
    seed: int = limit(1, 0, MAX_SEED, "the sampling seed: data-parallel rank r draws with seed + r, so a seed gives the same captions again.",
                      recorded="sampling")
    length_penalty: float = limit(1.0, 0.0, 10.0, "beam scores are log-probability / length**length_penalty, in (0, 10].",
                                  open_low=True, recorded="beams")

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def check(self, name: Callable[[str], str] = lambda n: "--" + n,
              caps: Optional[Dict[str, Tuple[int, str]]] = None) -> "Decoding":
        """Each setting within its limits (UserError naming it as `name` spells it: a flag, a
        request field), a cap (value, why) lowering some (the server's --max_gen_len); returns self."""
        for f in fields(self):
            self.check_one(f, name(f.name), (caps or {}).get(f.name))
        if 0 < self.temperature < MIN_TEMPERATURE:
            what = next(f for f in fields(self) if f.name == "temperature").metadata["what"]
            raise UserError(f"{name('temperature')} must be {what}, got {shown(self.temperature)}")
        if self.num_beams > 1 and self.sampling:
            raise UserError(f"{name('num_beams')} > 1 is beam search, which does not sample: leave {name('temperature')} at 0")
        return self

    def check_one(self, f, name: str, cap: Optional[Tuple[int, str]]) -> None:
        m, value = f.metadata, getattr(self, f.name)
        high, why = (cap[0], f" ({cap[1]})") if cap else (m["high"], "")
        # Written so that nan, which compares false, is refused with the rest.
        if (m["low"] < value if m["open_low"] else m["low"] <= value) and (high is None or value <= high):
            return
        raise UserError(f"{name} must be {m['what'] or span(f.type, m['low'], high, m['open_low'])}{why}, got {shown(value)}")

    def provenance(self) -> dict:
        """What a results file records of these settings: the ones its captions depend on (top_p
        and seed when sampling, length_penalty with beams), named as results files always had them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if self.records(f)}

    def records(self, f) -> bool:
        when = f.metadata["recorded"]
        if when == "sampling":
            return self.sampling
        if when == "beams":
            return self.num_beams > 1
        return when == "always" or getattr(self, f.name) != f.default

    def generator(self, rank: int, device) -> Optional[torch.Generator]:
        """Sampling's random generator on a data-parallel rank (seed + rank; every model-parallel
        rank of a group draws alike); None when decoding does not sample."""
        if not self.sampling:
            return None
        return torch.Generator(device=device).manual_seed(self.seed + rank)

    def image_generator(self, key: int, device) -> torch.Generator:
        """The continuous decoder's generator for one image (its id, or its place in a request):
        seeded by the seed and the key alone, so that the image's caption does not depend on the
        images it shares steps with, the ranks or the batch size."""
        return torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + int(key)) % (MAX_SEED + 1))

    @classmethod
    def from_settings(cls, settings) -> "Decoding":
        """The Decoding of a command's flags (those it has not keep their defaults), checked."""
        return cls(**{n: getattr(settings, n) for n in cls.names() if hasattr(settings, n)}).check()

    @classmethod
    def from_values(cls, values: dict, defaults: Optional[dict] = None,
                    caps: Optional[Dict[str, Tuple[int, str]]] = None) -> "Decoding":
        """The Decoding of a request's settings (numbers, or numbers as text from a form; missing
        ones take `defaults`, then Decoding's), checked; errors name the fields without dashes."""
        given = {f.name: parse_number(f.name, f.type, values.get(f.name)) for f in fields(cls)}
        chosen = dict(defaults or {}, **{k: v for k, v in given.items() if v is not None})
        return cls(**chosen).check(str, caps)


def parse_number(name: str, kind: type, value):
    """A request's value as `kind` (None when not given); UserError when it is not a number of that kind."""
    if value is None or value == "":
        return None
    if isinstance(value, str):  # form fields are text
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise UserError(f"{name} must be a number, got {shown(value)}") from None
    return number(name, kind, value)


def flags(name: str, skip: Sequence[str] = (), **defaults) -> type:
    """A config mixin whose fields are the flags of the Decoding settings (less `skip`), with
    Decoding's help and defaults (`defaults` changes some): a command's config inherits it."""
    made = [(f.name, f.type, setting(defaults.get(f.name, f.default), f.metadata["help"]))
            for f in fields(Decoding) if f.name not in skip]
    return make_dataclass(name, made, kw_only=True)


@torch.no_grad()
def decode(model: Transformer, prompts: List[List[int]], decoding: Decoding, *, eos_id: Union[int, Sequence[int]],
           prefix: Optional[torch.Tensor] = None, decoder=None,
           generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """The one way to decode: beam search when num_beams > 1 (always eager), else greedy or top-p
    sampling through `decoder` (a static_decode.StaticDecoder) or generation.generate. Each
    list of tokens stops before its end token; `generator`: `decoding.generator(rank, device)`."""
    if decoding.num_beams > 1:
        return beam_search(model, prompts, eos_id=eos_id, max_gen_len=decoding.max_gen_len,
                           num_beams=decoding.num_beams, prefix=prefix, length_penalty=decoding.length_penalty)
    run = decoder.generate if decoder is not None else functools.partial(generate, model)
    return run(prompts, eos_id=eos_id, max_gen_len=decoding.max_gen_len, prefix=prefix,
               temperature=decoding.temperature, top_p=decoding.top_p, generator=generator)
