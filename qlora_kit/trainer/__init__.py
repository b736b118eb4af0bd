"""qtrain: QLoRA fine-tuning of LoRA adapters against a frozen 4-bit checkpoint."""
from .config import TrainConfig, build_config, read_config_file
from .data import Example, load_examples, tokenize_record
from .errors import ConfigError, DataError, OutputExists, ResumeError, TrainError
from .ask import Answer, ask
from .loop import TrainResult, train

__all__ = ["TrainConfig", "build_config", "read_config_file", "Example", "load_examples", "tokenize_record",
           "ConfigError", "DataError", "OutputExists", "ResumeError", "TrainError", "TrainResult", "train", "Answer", "ask"]
