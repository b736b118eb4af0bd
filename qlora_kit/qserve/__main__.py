"""`python -m qlora_kit.qserve ...` = `qserve ...`."""
from .cli import main

main(prog_name="qserve")
