"""Typed exceptions. Each carries one sentence a user can act on; the CLI prints it without a traceback."""

from __future__ import annotations


class CompatError(Exception):
    """Base class for every error this project raises on purpose."""


class ConfigError(CompatError):
    """An experiment config is invalid; ``key`` is the dotted path of the offending entry."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"config key '{key}': {message}" if key else message)


class DataError(CompatError):
    """A dataset is missing or malformed."""


class StoreError(CompatError):
    """An embedding-store file is missing, partial or corrupt."""


class CheckpointError(CompatError):
    """A checkpoint cannot be loaded safely or does not fit the model."""


class RunError(CompatError):
    """A run directory is inconsistent with the request (e.g. resuming with another config)."""


class RunCancelled(CompatError):
    """A run was cancelled while it trained (a sweep's scheduler stopped its trial); finished steps are kept."""


class ConfigWarning(UserWarning):
    """A config is valid but probably not what its author meant (e.g. an override that drops settings)."""
