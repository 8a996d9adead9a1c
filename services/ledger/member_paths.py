"""Member ids holding a '/': the member routes are matched on the path as the client sent it.

The server percent-decodes the path before routing, so `/v1/members/wx%2FoAbC` arrived as
`/v1/members/wx/oAbC` (a 404), and `/v1/members/m-1%2Fentries`, the member `m-1/entries`,
as m-1's entries. The activity schema allows a '/' in an id and the pipeline pays such
members, so the API must reach them.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote, unquote, unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

MEMBERS: Final = "/v1/members/"


def routed_path(raw_path: bytes) -> str:
    """The path decoded segment by segment, each segment's '%' and '/' encoded again: a '/'
    the client encoded stays inside its segment, one it sent as is still separates them.
    Bytes that are not UTF-8 read as U+FFFD, as the server decodes them."""
    return "/".join(
        unquote_to_bytes(segment).decode("utf-8", "replace").replace("%", "%25").replace("/", "%2F")
        for segment in raw_path.partition(b"?")[0].split(b"/")
    )


def member_of(segment: str) -> str:
    """The member id a path segment of `routed_path` names."""
    return unquote(segment)


class RawMemberPath:
    """ASGI middleware: a member route's path as `routed_path` makes it from the raw one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(MEMBERS):
            # A server that keeps no raw path: its decoded one, every '/' a separator.
            raw = scope.get("raw_path") or quote(scope["path"]).encode()
            if b"%" in raw:  # else nothing was decoded: the path is the raw one already
                scope = {**scope, "path": routed_path(raw)}
        await self.app(scope, receive, send)
