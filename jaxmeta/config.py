"""One base for experiment configurations: typed fields that check themselves, the run identity and
the command-line flags, each written once.

A configuration is a frozen dataclass deriving from :class:`Config`; a field
that needs a check says so where it is declared::

    @dataclasses.dataclass(frozen=True)
    class MyConfig(Config):
        meta_steps: int = option(1_000, check=POSITIVE, help="meta-iterations in total")
        inner_lr: float = option(0.4, check=POSITIVE, help="inner learning rate")

    MyConfig(meta_steps=0).validate()   # ConfigError: meta-steps must be positive, got 0

``MyConfig.add_flags(parser)`` adds ``--meta-steps`` and ``--inner-lr`` with
parsers that refuse the same values in one line, and
``MyConfig.flag_values(args)`` reads back the ones given.  Presets are
instances (``dataclasses.replace(PRESETS[name], **overrides)``).  Subclasses
add their cross-field checks by overriding :meth:`Config.validate` (calling
``super().validate()`` first).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from jaxmeta.checkpoint import config_identity
from jaxmeta.cli import int_list, nonnegative_float, nonnegative_int, positive_float, positive_int
from jaxmeta.errors import ConfigError

POSITIVE = "positive"
"""An integer > 0, or a finite number > 0."""
NONNEGATIVE = "non-negative"
"""An integer >= 0, or a finite number >= 0."""

_PARSERS = {(int, POSITIVE): positive_int, (int, NONNEGATIVE): nonnegative_int,
            (float, POSITIVE): positive_float, (float, NONNEGATIVE): nonnegative_float}


def option(default: Any, *, check: str | None = None, choices: Sequence[str] | None = None,
            help: str | None = None, flag: bool = True) -> Any:
    """A configuration field: its default, its ``check`` (:data:`POSITIVE`, :data:`NONNEGATIVE` or
    ``None``) or its ``choices``, the ``help`` of its flag, and whether it has a flag at all."""
    if check not in (None, POSITIVE, NONNEGATIVE):
        raise ValueError(f"unknown check {check!r}")
    return dataclasses.field(default=default, metadata={"check": check, "choices": choices, "help": help,
                                                        "flag": flag})


def flag_name(name: str) -> str:
    """``inner_lr`` -> ``inner-lr``: how messages and flags spell a field."""
    return name.replace("_", "-")


def _passes(value: Any, check: str) -> bool:
    values = value if isinstance(value, tuple) else (value,)
    floor_ok = (lambda v: v > 0) if check == POSITIVE else (lambda v: v >= 0)
    return all(floor_ok(v) and math.isfinite(v) for v in values)


@dataclasses.dataclass(frozen=True)
class Config:
    """The base of every experiment's configuration (see the module docstring)."""

    IDENTITY_EXCLUDE: ClassVar[tuple[str, ...]] = ()
    """Fields that may change between the calls of one run (budget, bookkeeping, evaluation)."""
    IDENTITY_LATER: ClassVar[tuple[str, ...]] = ()
    """Fields added after runs were first written: out of the identity while at their defaults."""

    def validate(self) -> None:
        """Checks every field's declared check; raises :class:`ConfigError` naming the first that fails.

        Examples:
          >>> @dataclasses.dataclass(frozen=True)
          ... class Steps(Config):
          ...     steps: int = option(5, check=POSITIVE)
          >>> Steps(steps=0).validate()
          Traceback (most recent call last):
          ...
          jaxmeta.errors.ConfigError: steps must be positive, got 0
        """
        for f in dataclasses.fields(self):
            check, choices = f.metadata.get("check"), f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ConfigError(f"unknown {flag_name(f.name)} {value!r}; choose from {', '.join(choices)}")
            if check is not None and value is not None and not _passes(value, check):
                what = check if isinstance(value, int) and not isinstance(value, bool) else f"a {check} number"
                raise ConfigError(f"{flag_name(f.name)} must be {what}, got {value}")

    def identity(self) -> dict:
        """The fields a checkpoint must agree on to be resumed (model, task, algorithm)."""
        return config_identity(self, exclude=self.IDENTITY_EXCLUDE, later=self.IDENTITY_LATER)

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, *, skip: Sequence[str] = (),
                  types: dict[str, Callable[[str], Any]] | None = None, helps: dict[str, str] | None = None) -> None:
        """Adds ``--field-name`` for every field with a flag (not in ``skip``), defaulting to ``None``
        (not given), parsed by its type and check; ``types`` replaces a field's parser, ``helps`` its help."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("flag", True) or f.name in skip:
                continue
            parse = (types or {}).get(f.name) or _parser(hints[f.name], f.metadata.get("check"))
            help_text = (helps or {}).get(f.name, f.metadata.get("help"))
            if parse is bool:
                parser.add_argument(f"--{flag_name(f.name)}", action="store_true", default=None, help=help_text)
            elif f.metadata.get("choices") is not None:
                parser.add_argument(f"--{flag_name(f.name)}", choices=f.metadata["choices"], help=help_text)
            else:
                parser.add_argument(f"--{flag_name(f.name)}", type=parse, help=help_text)

    @classmethod
    def flag_values(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The fields given on the command line: ``{name: value}`` for every generated flag that is not ``None``."""
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                if f.metadata.get("flag", True) and getattr(args, f.name, None) is not None}


def _parser(hint: Any, check: str | None) -> Callable[[str], Any]:
    """The argparse type of a field annotated ``hint`` with ``check``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args[:1] == (int,):
        return int_list
    if type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        return bool
    if (hint, check) in _PARSERS:
        return _PARSERS[hint, check]
    if hint in (int, float, str):
        return hint
    raise TypeError(f"no command-line parser for a field of type {hint!r}: pass one in types=")
