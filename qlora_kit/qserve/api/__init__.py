"""HTTP layer of qserve: the one FastAPI app over a Backend (native engine or vLLM), API-key auth, and the one
error boundary."""
from .app import create_app
from .auth import KeyStore, Principal
from .backend import Backend

__all__ = ["Backend", "KeyStore", "Principal", "create_app"]
