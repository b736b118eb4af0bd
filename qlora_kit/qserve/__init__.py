"""qserve: one 4-bit base, many hot-swappable LoRA adapters, OpenAI-compatible HTTP API.

The engine core (scheduler, block manager, adapter registry, config) is plain Python; torch enters only through
the model runner, engine loop and server (qserve.engine.runner / .engine / qserve.server), not imported here.
The public API is the engine core's (qserve.engine), every error class (qserve.errors) and the registry/config.
"""
from . import engine as _engine
from . import errors as _errors
from .adapter_entry import AdapterInfo, AdapterState
from .adapters import AdapterRegistry, RegistryConfig
from .config import ServeConfig
from .engine import *  # noqa: F403 (listed in qserve.engine.__all__)
from .errors import *  # noqa: F403 (every ServeError subclass)

__all__ = sorted(["AdapterInfo", "AdapterRegistry", "AdapterState", "RegistryConfig", "ServeConfig",
                  *_engine.__all__, *_errors.__all__])
