"""Errors raised by trainer/: one subclass of QloraKitError per failure mode; messages name the file, line or field."""
from qlora_kit.formats.errors import QloraKitError


class TrainError(QloraKitError):
    """Base class of trainer/ errors."""


class ConfigError(TrainError, ValueError):
    """A config file that cannot be parsed, an unknown key, or a field value out of range (also a ValueError,
    as STYLE.md asks of config validation)."""


class DataError(TrainError):
    """A dataset line that is not valid JSON or not one of the accepted record shapes, an empty dataset,
    or an example longer than --max-seq-len."""


class OutputExists(TrainError):
    """The output folder already exists and this is not a --resume of it."""


class MergeError(TrainError):
    """`qtrain merge` input that cannot be merged: a base that is not a 4-bit checkpoint, an unknown --format,
    an adapter module with no weight in the base."""


class ResumeError(TrainError):
    """A --resume checkpoint that is missing, incomplete, or from a different configuration."""


class NonFiniteTraining(TrainError):
    """A step whose loss or gradient norm is NaN or inf: training stops, the last good state is kept as a
    checkpoint (the same policy for train and each train-many job)."""


class PublishError(TrainError):
    """`qtrain publish`: a bad repo id, an unreadable train_config.json / metrics.jsonl, or a failed upload."""
