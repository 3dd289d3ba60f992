"""The PatchCore engine: patch features, memory bank, nearest-neighbour search and scoring."""
