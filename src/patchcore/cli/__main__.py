"""`python -m patchcore.cli`: the `patchcore` command."""

from . import main

main()
