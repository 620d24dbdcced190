"""Errors (and warnings) that the command-line tools turn into one clear line.

An error exits with code 2; a :class:`JaxmetaWarning` prints ``warning: ...`` and the
program goes on.
"""

from __future__ import annotations


class JaxmetaError(Exception):
    """Base class: a user-facing problem (bad input, missing data, bad checkpoint)."""


class ConfigError(JaxmetaError, ValueError):
    """An invalid configuration value or an impossible combination of values."""


class DataError(JaxmetaError):
    """Missing, corrupt or unusable data."""


class CheckpointError(JaxmetaError):
    """A checkpoint that is missing, corrupt or does not match the configuration."""


class MissingExtraError(JaxmetaError, ImportError):
    """An optional dependency is not installed: the message names the extra that installs it."""


def missing_extra(error: ImportError, extra: str, what: str) -> MissingExtraError:
    """The one-line error for ``error`` raised while importing ``what``'s optional dependencies.

    Examples:
      >>> str(missing_extra(ImportError(name="sacrebleu"), "translation", "BLEU scores"))
      "BLEU scores: sacrebleu is not installed; pip install 'jaxmeta[translation]'"
    """
    return MissingExtraError(f"{what}: {error.name or error} is not installed; pip install 'jaxmeta[{extra}]'")


class JaxmetaWarning(UserWarning):
    """Something the user should know that does not stop the program (a damaged
    checkpoint skipped, a run's data differing from the data at hand)."""
