"""The one place where errors become HTTP: status code + OpenAI-style JSON body.

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": 400}}

Every qserve error class maps to one status; request-validation errors are 400 (not FastAPI's 422).
"""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from qlora_kit.models.errors import SamplingError, TokenizerError

from .. import errors as E

log = logging.getLogger("qserve")

STATUS: list[tuple[type, int, str]] = [  # first match wins (subclasses before their bases)
    (E.Unauthorized, 401, "authentication_error"),
    (E.Forbidden, 403, "permission_error"),
    (E.AdapterNotFound, 404, "not_found_error"),
    (E.RequestNotFound, 404, "not_found_error"),
    (E.BodyTooLarge, 413, "invalid_request_error"),
    (E.PromptTooLong, 413, "invalid_request_error"),
    (E.QueueFull, 429, "rate_limit_error"),
    (E.AdapterExists, 400, "invalid_request_error"),
    (E.AdapterRefused, 400, "invalid_request_error"),
    (E.InvalidRequest, 400, "invalid_request_error"),
]


def status_of(err: Exception) -> tuple[int, str]:
    if isinstance(err, E.UpstreamError):  # the vLLM server's own status, passed through
        return err.status, "invalid_request_error" if err.status < 500 else "server_error"
    for cls, status, kind in STATUS:
        if isinstance(err, cls):
            return status, kind
    return 400, "invalid_request_error"


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(message: str, status: int, kind: str = "invalid_request_error", param=None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(message, kind, status, param), status_code=status, headers=headers)


def _validation_message(errors) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")  # our own ValueErrors' text
    return (f"{loc}: {msg}" if loc else msg), loc or None


def install(app: FastAPI) -> None:
    """Register the exception handlers on `app`."""

    @app.exception_handler(E.ServeError)
    async def _serve_error(request: Request, err: E.ServeError):
        status, kind = status_of(err)
        return error_response(str(err), status, kind)

    @app.exception_handler(TokenizerError)
    @app.exception_handler(SamplingError)
    async def _model_input(request: Request, err: TokenizerError | SamplingError):  # a template or setting (400)
        return error_response(str(err), 400)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, err: RequestValidationError):
        msg, param = _validation_message(err.errors())
        return error_response(msg, 400, param=param)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, err: ValidationError):
        msg, param = _validation_message(err.errors())
        return error_response(msg, 400, param=param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return error_response(str(err.detail), err.status_code,
                              "not_found_error" if err.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(f"internal error: {type(err).__name__}", 500, "server_error")
