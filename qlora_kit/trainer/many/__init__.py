"""Many adapters against one base in one run (`qtrain train-many`), and torchrun data parallelism for one."""
from .jobs import JobSpec, ManyConfig, load_jobs
from .run import ManyResult, train_data_parallel, train_many

__all__ = ["JobSpec", "ManyConfig", "ManyResult", "load_jobs", "train_data_parallel", "train_many"]
