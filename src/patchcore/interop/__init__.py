"""Models from other PatchCore implementations, converted into our model folders."""

from .pci import BACKBONES, PciImportError, convert, import_pci, read_plain_pickle

__all__ = ["BACKBONES", "PciImportError", "convert", "import_pci", "read_plain_pickle"]
