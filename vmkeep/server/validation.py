"""The reply to a request body or query the API's schema refuses (422).

FastAPI's own reply repeats each error's ``input``: the value sent, or for a missing field the
whole body, so a user created with a too-short password would see it echoed in a response (and
in any log or proxy that keeps responses). The reply here is the same without ``input``: the
location, message and type say what to fix.
"""

from __future__ import annotations

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import Request


async def validation_failed(_request: Request, exc: Exception) -> JSONResponse:
    found = exc.errors() if isinstance(exc, RequestValidationError) else []
    errors = [{key: value for key, value in error.items() if key != "input"} for error in found]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)
