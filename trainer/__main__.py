"""`python -m trainer ...` = `qtrain ...`, so torchrun can launch it: torchrun --nproc-per-node N -m trainer train ..."""
from .cli import main

main(prog_name="qtrain")
