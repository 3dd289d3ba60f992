"""Backbone registry: `get_backbone(name)`, `list_backbones()`; entries live in sibling modules.

timm and open_clip are imported only inside builders, so importing these modules is cheap.
"""

from __future__ import annotations

from . import clip, cnn, pathology, transformers  # noqa: F401 - each registers its entries
from .registry import BackboneSpec, backbone_names, get_backbone, register, register_prefix

__all__ = ["BackboneSpec", "backbone_names", "get_backbone", "register", "register_prefix"]
