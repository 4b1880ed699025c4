"""Settings, each defined once: a dataclass field with its default and one line of help.

An entry point is `command(SomeConfig, run, summary)`: its command-line flags, their defaults
and its `--help` text (fire reads the signature and the docstring) are built from the fields,
so a flag is written in one place. Values are type-checked and range-checked in the config's
`__post_init__`, before anything is loaded, so a bad flag is a one-line error naming it.
"""

import dataclasses
import difflib
import functools
import inspect
import json
import math
import typing
from dataclasses import MISSING, field, fields
from typing import Any, Callable, Dict, Iterable, List, Optional

from .errors import UserError, exit_on_user_error


def setting(default: Any = MISSING, help: str = "") -> Any:
    """A config field with one line of help (shown by --help and kept with the field)."""
    return field(default=default, metadata={"help": help})


def _plain_type(annotation):
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def shown(value) -> str:
    """A value as a message quotes it: at most 40 characters (a 400-digit number is cut)."""
    text = repr(value) if isinstance(value, (int, float)) else json.dumps(value, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def finite(name: str, value) -> float:
    """A number as a float, refused (UserError naming it) when it is NaN, infinite, or too large
    for a float (a 400-digit whole number). Every float setting, flag or request field, passes here."""
    try:
        number = float(value)
    except OverflowError:
        raise UserError(f"{name} {shown(value)} is too large for a number") from None
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number, got {shown(value)}")
    return number


MAX_WHOLE = 2 ** 63 - 1  # beyond what torch, numpy and the seeds take


def number(name: str, kind: type, value) -> Any:
    """A flag's or a request field's value as `kind` (int or float), or UserError naming it: not a
    number, NaN or infinite, a float that is not whole where a whole number is asked (5.0 is 5),
    or beyond what the kind holds. The one check of every numeric setting, flag or field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be {'a whole number' if kind is int else 'a number'}, got {shown(value)}")
    if kind is float:
        return finite(name, value)
    if isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{name} must be a whole number, got {shown(value)}")
        value = int(value)
    if abs(value) > MAX_WHOLE:
        raise UserError(f"{name} {shown(value)} is too large: at most {MAX_WHOLE}")
    return value


def _coerce(name: str, value: Any, annotation) -> Any:
    kind, optional = _plain_type(annotation)
    if value is None:
        if optional:
            return None
        raise UserError(f"--{name} needs a value")
    flag = f"--{name}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{flag} must be True or False, got {value!r}")
    if kind in (int, float):
        return number(flag, kind, value)
    if kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # fire reads `--split 1` as a number
        if isinstance(value, str):
            return value
        raise UserError(f"{flag} must be a string, got {value!r}")
    if typing.get_origin(kind) in (list, List):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        item = (typing.get_args(kind) or (str,))[0]
        if item is int:
            if isinstance(value, (list, tuple)) and value:
                return [number(flag, int, v) for v in value]
            raise UserError(f"{flag} must be a whole number or a list of them, got {shown(value)}")
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
        raise UserError(f"{flag} must be a list of strings, got {value!r}")
    return value


class Config:
    """Base of every command's settings: type checks, then the subclass's `check`."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.check()

    def check(self) -> None:
        """Range and consistency checks of the settings; raise UserError naming the flag."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # Small helpers for `check`.
    def at_least(self, low, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value < low:
                raise UserError(f"--{name} must be at least {low}, got {value}")

    def one_of(self, name: str, choices: Iterable[str]) -> None:
        choices = tuple(choices)
        if getattr(self, name) not in choices:
            raise UserError(f"--{name} {getattr(self, name)!r} must be one of {', '.join(choices)}")


class Required:
    """The default fire shows for a flag without one; a command that gets it says which flag is
    missing in one line (fire's own message is its whole usage)."""

    def __repr__(self) -> str:
        return "(required)"


REQUIRED = Required()


def help_text(cls) -> str:
    """The Args section of a docstring (fire shows it under --help), one line per field."""
    return "Args:\n" + "".join(f"    {f.name}: {f.metadata.get('help', '')}\n" for f in fields(cls) if f.init)


def _parameters(cls, varargs: Optional[str]) -> list:
    """The command's parameters, one per field of `cls` (a REQUIRED default where it has none)."""
    hints = typing.get_type_hints(cls)
    params, how = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    # An inherited settings group (LlamaSettings) is keyword-only in the dataclass: its required
    # fields come first on the command line, its optional ones last.
    group = lambda f: 1 if not f.kw_only else 0 if f.default is MISSING else 2  # noqa: E731
    for f in sorted((f for f in fields(cls) if f.init), key=group):
        default = REQUIRED if f.default is MISSING else f.default
        kind, _ = _plain_type(hints[f.name])
        # fire adds Optional[...] itself where the default is None.
        params.append(inspect.Parameter(f.name, how, default=default, annotation=kind))
        if f.name == varargs:  # further words are more of it; every later field needs its flag
            params.append(inspect.Parameter("more_" + varargs, inspect.Parameter.VAR_POSITIONAL))
            how = inspect.Parameter.KEYWORD_ONLY
    return params


def _bound_values(signature: inspect.Signature, args: list, kwargs: dict, varargs: Optional[str]) -> dict:
    """The flags as field values: every required one given, varargs' further words joined in."""
    try:
        values = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise UserError(f"{e}: see --help") from None
    values.apply_defaults()
    values = dict(values.arguments)
    missing = [f"--{k}" for k, v in values.items() if v is REQUIRED]
    if missing:
        raise UserError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                        f"(--help says what each takes)")
    if varargs:
        extra = values.pop("more_" + varargs, ())
        if extra:
            first = values[varargs]
            values[varargs] = (list(first) if isinstance(first, (list, tuple)) else [first]) + list(extra)
    return values


def command(cls, run: Callable, summary: str, varargs: Optional[str] = None,
            interrupted: str = "what was already written is kept") -> Callable:
    """A fire entry point whose flags are the fields of `cls`; calls run(cls(**flags)).

    varargs: a list field that also takes the words after it (`--images a.jpg b.jpg dir/`).
    interrupted: what the line printed on ^C tells the user (what is kept, how to go on).
    """
    params = _parameters(cls, varargs)
    # Flags it does not know come into a catch-all, so that a misspelt one is refused before any
    # work (fire would otherwise run the command first and complain about the leftover after).
    signature = inspect.Signature(params)
    known = [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    # fire's --help offers -x for a flag whose first letter no other flag starts with: take it.
    short = {k[0]: k for k in known if sum(o[0] == k[0] for o in known) == 1 and len(k) > 1}
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    @functools.partial(exit_on_user_error, interrupted=interrupted)
    def main(*args, **kwargs):
        args = list(args)
        for k in [k for k in kwargs if k in short]:  # fire passes a short flag by its letter
            name, value = short[k], kwargs.pop(k)
            if name in positional and positional.index(name) < len(args):  # fire filled it in by place
                args[positional.index(name)] = value
            else:
                kwargs[name] = value
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            near = difflib.get_close_matches(unknown[0], known, n=1)
            raise UserError(f"unknown flag --{unknown[0]}" + (f": did you mean --{near[0]}?" if near else "") + " (see --help)")
        run(cls(**_bound_values(signature, args, kwargs, varargs)))  # nothing returned: fire would print it

    main.__signature__ = signature.replace(parameters=params + [inspect.Parameter("flags", inspect.Parameter.VAR_KEYWORD)])
    main.__doc__ = summary.strip() + "\n\n" + help_text(cls)
    main.config = cls
    return main
