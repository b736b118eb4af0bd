"""Errors raised by qserve/. All derive from `ServeError`, itself a `formats.errors.QloraKitError`.

Messages name the adapter, request field or limit at fault and, where there is one, the fix. The HTTP layer
(`qserve/api/errors.py`) maps each class to one status code; the suggested code is noted per class.
"""
from qlora_kit.formats.errors import QloraKitError


class ServeError(QloraKitError):
    """Base class of every error qserve raises on bad input or failed work."""


class AdapterNotFound(ServeError):
    """No adapter of that name is registered, or it is being unloaded (HTTP 404)."""


class AdapterExists(ServeError):
    """An adapter of that name is already registered (HTTP 400, as vLLM's load_lora_adapter)."""


class AdapterRefused(ServeError):
    """An adapter that cannot be served: its loader failed, it does not match the base, or no room (HTTP 400)."""


class AdapterPathRefused(AdapterRefused):
    """An adapter path outside the allowed root, escaping by symlink or `..`, or not safetensors (HTTP 400/403)."""


class InvalidRequest(ServeError, ValueError):
    """A request field out of range (e.g. top_p=2). Also a ValueError so config-style callers catch it (HTTP 400)."""


class PromptTooLong(ServeError):
    """A prompt that can never fit the model length or the KV cache (HTTP 400/413)."""


class QueueFull(ServeError):
    """The waiting queue is at its limit; retry later (HTTP 429)."""


class RequestNotFound(ServeError):
    """A request id the scheduler does not know (HTTP 404)."""


class Unauthorized(ServeError):
    """No API key, or one the key file does not list (HTTP 401)."""


class Forbidden(ServeError):
    """A valid key asking for an adapter of another tenant, or an admin call without the admin key (HTTP 403)."""


class BodyTooLarge(ServeError):
    """A request body over the server's max_body_bytes (HTTP 413)."""


class SamplingFailed(ServeError):
    """One request's sampling step failed (e.g. its parameters overflow); it ends that request alone (HTTP 500)."""


class UpstreamError(ServeError):
    """The vLLM server behind the front refused or failed a call; `status` is its HTTP status (or 502)."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


class KeyFileError(ServeError, ValueError):
    """An --api-keys file that cannot be read or breaks its schema; refused at start-up (CLI exit 2)."""


class ServeConfigError(ServeError, ValueError):
    """A server setting that cannot work (e.g. --allowed-root that is not a folder); refused at start-up."""


__all__ = sorted(n for n, v in dict(globals()).items() if isinstance(v, type) and issubclass(v, ServeError))
