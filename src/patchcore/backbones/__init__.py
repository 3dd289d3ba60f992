"""Backbone registry: `get_backbone(name)`, `list_backbones()`; entries live in sibling modules."""

from __future__ import annotations

from . import cnn  # noqa: F401 - registers the CNN entries
from .registry import BackboneSpec, backbone_names, get_backbone, register, register_prefix

__all__ = ["BackboneSpec", "backbone_names", "get_backbone", "register", "register_prefix"]
