"""The adapter store: a folder of adapters resolved by name on a request's first use (store.py), Hub repo ids
allowed by the operator, fetched into the Hugging Face cache on first use (hub.py), the host-tier
byte budget (budget.py) and the fleet's counters for /metrics (stats.py). Plain Python (no torch)."""
from .budget import parse_bytes
from .hub import HubSource
from .stats import FleetStats
from .store import AdapterStore

__all__ = ["AdapterStore", "FleetStats", "HubSource", "parse_bytes"]
