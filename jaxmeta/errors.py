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


class JaxmetaWarning(UserWarning):
    """Something the user should know that does not stop the program (a damaged
    checkpoint skipped, a run's data differing from the data at hand)."""
