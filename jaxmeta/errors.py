"""Errors that the command-line tools turn into one clear line and exit code 2."""

from __future__ import annotations


class JaxmetaError(Exception):
    """Base class: a user-facing problem (bad input, missing data, bad checkpoint)."""


class ConfigError(JaxmetaError, ValueError):
    """An invalid configuration value or an impossible combination of values."""


class DataError(JaxmetaError):
    """Missing, corrupt or unusable data."""


class CheckpointError(JaxmetaError):
    """A checkpoint that is missing, corrupt or does not match the configuration."""
