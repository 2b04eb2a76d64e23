"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""
from __future__ import annotations


class XmodalError(Exception):
    """Base class: a problem with the user's input (paths, files, configs, checkpoints)."""


class ConfigError(XmodalError, ValueError):
    """A recipe key or value that is not valid."""


class DataError(XmodalError, ValueError):
    """A dataset that is missing, empty, corrupt or in an unexpected layout."""


class CheckpointError(XmodalError, ValueError):
    """A checkpoint that is missing, corrupt, or made for another network."""
