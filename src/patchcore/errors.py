"""Error hierarchy: every user-facing failure names the file or setting at fault and the fix."""

from __future__ import annotations


class PatchCoreError(Exception):
    """Base class of every error this package raises on purpose."""


class DataError(PatchCoreError):
    """An image, mask or dataset folder cannot be used as given."""


class ModelFileError(PatchCoreError):
    """A model folder is missing, corrupted, foreign or from an incompatible version."""


class WeightsNotFoundError(PatchCoreError):
    """Pretrained backbone weights are not available on this machine."""


class BackboneError(PatchCoreError):
    """An unknown backbone or layer name, or a backbone that cannot produce features."""


class ConfigError(PatchCoreError):
    """A hyperparameter has an invalid value."""


class NotFittedError(PatchCoreError):
    """A model was used before `fit` or `load`."""
