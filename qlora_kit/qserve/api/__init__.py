"""HTTP layer of qserve: FastAPI app, API-key auth, and the one error boundary."""
from .app import create_app
from .auth import KeyStore, Principal

__all__ = ["KeyStore", "Principal", "create_app"]
