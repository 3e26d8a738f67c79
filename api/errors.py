"""Errors mapped once, for every route: what a client gets instead of a 500.

* A request that fails validation answers 422 with one entry per problem (``loc`` names the
  field). FastAPI's own handler echoes each bad input back; an input that JSON cannot carry (NaN,
  an infinity from ``1e400``, a lone surrogate such as ``"\\ud800"``) then fails to serialise and
  the client got a 500. Here an input is echoed only when it survives strict JSON encoding.
* A body that is not valid JSON (a non-UTF-8 body, JSON nested beyond the parser's depth) answers
  422 naming ``body``.
* The database unreachable, or no pooled connection free within ``TAILOR_DB_POOL_TIMEOUT_S``:
  503 JSON with ``Retry-After``. The request did nothing: every write is one transaction.
* Anything else unexpected: 500 JSON (logged with its traceback), never text/plain.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

log = logging.getLogger(__name__)

DATABASE_BUSY_RETRY_S = 1
DATABASE_DOWN_RETRY_S = 5
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


def _json_safe(value: Any) -> bool:
    """Whether ``value`` encodes as strict JSON in UTF-8 (no NaN/infinity, no lone surrogates)."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
        return False
    return True


def validation_problems(errors: list[dict]) -> list[dict]:
    """Pydantic's errors made safe to send: ``type``, ``loc``, ``msg`` always; ``input`` and
    ``ctx`` only when they encode as strict JSON (``ctx`` values as text)."""
    problems = []
    for error in errors:
        loc = [part if isinstance(part, int) else str(part).encode("utf-8", "replace").decode() for part in error.get("loc", ())]
        problem: dict[str, Any] = {"type": error.get("type", "value_error"), "loc": loc,
                                   "msg": str(error.get("msg", "invalid value")).encode("utf-8", "replace").decode()}
        if "input" in error and _json_safe(error["input"]):
            problem["input"] = error["input"]
        ctx = {k: str(v) for k, v in (error.get("ctx") or {}).items()}
        if ctx and _json_safe(ctx):
            problem["ctx"] = ctx
        problems.append(problem)
    return problems


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": validation_problems(list(exc.errors()))}, status_code=422)


def _unreadable_body(exc: Exception) -> JSONResponse:
    problem = {"type": "json_invalid", "loc": ["body"],
               "msg": f"the body is not valid JSON in UTF-8 ({type(exc).__name__})"}
    return JSONResponse({"detail": [problem]}, status_code=422)


def _unreadable_form(message: str) -> JSONResponse:
    problem = {"type": "multipart_invalid", "loc": ["body"], "msg": f"the body is not valid form data: {message}"}
    return JSONResponse({"detail": [problem]}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI turns a body its JSON parser chokes on (other than a plain syntax error, which is
    already a 422) into a bare 400, and Starlette does the same with a form body it cannot parse;
    answer 422 naming the body like every other invalid input."""
    if exc.status_code == 400 and exc.detail == FASTAPI_BODY_PARSE_ERROR and exc.__cause__ is not None:
        return _unreadable_body(exc.__cause__)
    if exc.status_code == 400 and isinstance(exc.__context__, MultiPartException):
        return _unreadable_form(str(exc.detail))
    return await http_exception_handler(request, exc)


async def _database_busy(_request: Request, exc: PoolTimeoutError) -> JSONResponse:
    log.warning("no database connection free in time: %s", exc)
    return JSONResponse({"detail": "the database is busy; retry shortly"}, status_code=503,
                        headers={"Retry-After": str(DATABASE_BUSY_RETRY_S)})


async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
    if isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated:
        log.warning("database unavailable during %s %s: %s", request.method, request.url.path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return JSONResponse({"detail": "the database is unavailable; retry later"}, status_code=503,
                            headers={"Retry-After": str(DATABASE_DOWN_RETRY_S)})
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(PoolTimeoutError, _database_busy)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
