"""`python -m qlora_kit.qconvert ...` = `qconvert ...`."""
from .cli import main

main(prog_name="qconvert")
