"""python -m profuser (also: torchrun --nproc_per_node N -m profuser run RECIPE)."""

from .cli import main

main()
