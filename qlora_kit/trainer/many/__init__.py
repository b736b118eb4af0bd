"""The training engine: many adapters against one base in one run (`qtrain train-many`; `qtrain train` is one job)."""
from .jobs import JobSpec, ManyConfig, load_jobs
from .run import ManyResult, train_many

__all__ = ["JobSpec", "ManyConfig", "ManyResult", "load_jobs", "train_many"]
