"""What the three CLIs (qconvert, qtrain, qserve) share: the error boundary, options generated from a config
dataclass, option checks (sizes, OUT against SRC), the byte progress bar and the Hub/checkpoint helpers. It sits
above formats/ (click and rich stay out of the bottom layer) and below the CLIs."""
from .boundary import Terminated, cli_errors
from .options import dataclass_options

__all__ = ["Terminated", "cli_errors", "dataclass_options"]
