"""A cap on request bodies, checked before the application reads a byte of them.

Without it uvicorn and FastAPI buffered any body whole before the key was looked at: an
unauthenticated client could make the ledger hold 30 MB (or 3 GB) to be told 401. The
API's bodies are a few hundred bytes, so the cap (`LEDGER_MAX_BODY_BYTES`) is far above
any real request.
"""

from __future__ import annotations

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROBLEM = b"application/problem+json"


class BodyLimit:
    """ASGI middleware: a declared `Content-Length` over the cap is refused before reading;
    a body without one (chunked) is read up to the cap and refused as soon as it passes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit():
            if int(declared) > self.limit:
                await self._refuse(scope, send)
                return
            # The server delivers no more than the declared length: nothing to count (and
            # the reads, every GET among them, pass untouched).
            await self.app(scope, receive, send)
            return
        if "transfer-encoding" not in headers:  # no body at all
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before it finished
                return
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            # The body once, as one message; after it, the client's own (a disconnect).
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        problem = orjson.dumps(
            {
                "type": "about:blank",
                "title": "Content too large",
                "status": 413,
                "detail": f"a request body may have at most {self.limit} bytes",
                "instance": scope.get("path", ""),
            }
        )
        headers = [
            (b"content-type", PROBLEM),
            (b"content-length", str(len(problem)).encode()),
            (b"connection", b"close"),  # the rest of the body is never read
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": problem})
