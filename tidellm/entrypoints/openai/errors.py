"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Every failure a client can cause becomes a 4xx that names the parameter at fault; engine trouble is a 5xx.
Handlers raise :class:`APIError`; the exception handlers installed by :func:`install_error_handlers` also
map pydantic validation errors and malformed JSON.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tidellm.engine.core_client import EngineDeadError
from tidellm.engine.input_processor import PromptTooLongError

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to return as an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    err_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


# ------------------------------------------------------------------------------------- constructors
def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def engine_dead(reason: str | None = None) -> APIError:
    msg = "The engine is not running"
    return APIError(503, f"{msg}: {reason}" if reason else f"{msg}.", code="engine_unavailable")


_PARAM_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)")


def from_exception(
    e: Exception, prompt_param: str = "prompt", max_tokens_param: str = "max_tokens"
) -> APIError:
    """Map exceptions raised while submitting a request (validation, context length, dead engine)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, PromptTooLongError):
        param = prompt_param if e.prompt_tokens >= e.max_model_len else max_tokens_param
        return bad_request(str(e), param=param, code="context_length_exceeded")
    if isinstance(e, EngineDeadError):
        return engine_dead(str(e))
    if isinstance(e, (ValueError, TypeError)):
        # SamplingParams messages start with the parameter name: "top_p must be in (0, 1] (got 2.0)";
        # input-processor ones with "The prompt" / "prompt token id".
        text = str(e)
        m = _PARAM_RE.match(text)
        if m and " must " in text:
            param = m.group(1)
        elif text.lower().startswith(("the prompt", "prompt")):
            param = prompt_param
        else:
            param = None
        return bad_request(text, param=param)
    logger.exception("Unexpected error")
    return APIError(500, f"Internal error: {type(e).__name__}: {e}")


# Names pydantic inserts in error locations for the branches of a union (``stop: str | list[str]``).
_UNION_TAGS = frozenset(
    {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "constrained-str"}
)


def _loc_to_param(loc: tuple | list) -> str:
    """pydantic's ``('body', 'messages', 0, 'content')`` → ``messages[0].content``."""
    out = ""
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif str(p).lower() in _UNION_TAGS or "[" in str(p):
            continue
        else:
            out += ("." if out else "") + str(p)
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return bad_request(f"The request body is not valid JSON: {ctx.get('error', first.get('msg'))}.")
    param = _loc_to_param(first.get("loc", ()))
    if not param:
        return bad_request(f"Invalid request body: {first.get('msg')}.")
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    inp = first.get("input")
    shown = "" if isinstance(inp, (dict, list)) else f" (got {inp!r})"
    return bad_request(f"Invalid value for '{param}': {msg}{shown}.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "Error"
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else phrase
        return APIError(exc.status_code, detail).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()
