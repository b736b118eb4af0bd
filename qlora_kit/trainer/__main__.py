"""`python -m qlora_kit.trainer ...` = `qtrain ...`, so torchrun can launch it: torchrun --nproc-per-node N -m qlora_kit.trainer train ..."""
from .cli import main

main(prog_name="qtrain")
