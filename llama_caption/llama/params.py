"""One checker for the fields of a model's description, Meta's `params.json` and Hugging Face's
`config.json` alike: each field is checked where the file is read, and a bad one is a one-line
error naming the file, the field and what it should be (not a traceback, not NaNs later).

A spec maps a field to a kind (`POSITIVE_INT`, ...) and whether the file must have it; fields the
spec does not name are left alone (both formats carry many we do not use). `check_architecture`
then checks what the fields must satisfy together.
"""

import math
from typing import Any, Dict, Tuple

from ..errors import UserError


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# kind: (test, what the field should be)
POSITIVE_INT = (lambda v: _whole(v) and v >= 1, "a whole number of at least 1")
POSITIVE = (lambda v: _number(v) and v > 0, "a positive number")
VOCAB = (lambda v: _whole(v) and (v >= 1 or v == -1), "a whole number of at least 1 (or -1: from the weights)")
BOOL = (lambda v: isinstance(v, bool), "true or false")
TOKEN_IDS = (lambda v: (_whole(v) and v >= 0) or (isinstance(v, list) and v and all(_whole(i) and i >= 0 for i in v)),
             "a token id or a non-empty list of them")
OBJECT = (lambda v: isinstance(v, dict), "a JSON object")
LIST = (lambda v: isinstance(v, list), "a JSON list")
TEXT = (lambda v: isinstance(v, str), "a string")

Spec = Dict[str, Tuple[Tuple[Any, str], bool]]  # field: (kind, required)


def check_fields(values: dict, spec: Spec, path: str) -> None:
    """Every field of `spec` in `values` (from the file at `path`) is of its kind; required ones
    are there. null counts as absent for optional fields, as both formats write it."""
    for name, ((test, what), required) in spec.items():
        value = values.get(name)
        if value is None and not required:
            continue
        if name not in values:
            raise UserError(f"{path}: {name} is missing: it should be {what}")
        if not test(value):
            raise UserError(f"{path}: {name} is {value!r}: it should be {what}")


def check_token_ids(values: dict, names, vocab: int, path: str) -> None:
    """Special-token ids (BOS, EOS) inside the vocabulary."""
    for name in names:
        value = values.get(name)
        ids = value if isinstance(value, list) else [] if value is None else [value]
        for i in ids:
            if i >= vocab:
                raise UserError(f"{path}: {name} {value!r} is beyond the vocabulary of {vocab} tokens")


def check_rope_scaling(scaling, keys, path: str, field: str = "rope_scaling") -> dict:
    """The llama3 frequency scaling's numbers (`keys`), each a positive number."""
    if not isinstance(scaling, dict):
        raise UserError(f"{path}: {field} is {scaling!r}: it should be a JSON object")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise UserError(f"{path}: {field} of type llama3 lacks {', '.join(missing)}")
    for k in keys:
        if not POSITIVE[0](scaling[k]):
            raise UserError(f"{path}: {field}.{k} is {scaling[k]!r}: it should be {POSITIVE[1]}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError(f"{path}: {field}.high_freq_factor must be above low_freq_factor")
    return {k: float(scaling[k]) for k in keys}


def check_architecture(args, path: str) -> None:
    """What the fields of a ModelArgs must satisfy together (heads dividing the width, key/value
    heads dividing the heads, an even head size for the rotary pairs)."""
    if args.dim % args.n_heads:
        raise UserError(f"{path}: the width {args.dim} is not a multiple of the {args.n_heads} heads")
    if args.head_dim % 2:
        raise UserError(f"{path}: the head size {args.head_dim} (width / heads) must be even for rotary embeddings")
    if args.n_heads % args.kv_heads:
        raise UserError(f"{path}: the {args.n_heads} heads are not a multiple of the {args.kv_heads} key/value heads")
