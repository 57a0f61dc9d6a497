"""The console's door: the access token, cross-site requests, and the upload size limit, checked before any page.

- **Token.** When set, every request needs it: the `tunery_token` cookie (set when the URL `tunery ui` printed,
  `...?token=T`, is opened), an `Authorization: Bearer T` header, or `?token=T`. Anything else gets 401.
- **Cross-site.** A state-changing request (POST, PUT, PATCH, DELETE) whose Origin is another site is refused
  (403): a page elsewhere cannot start jobs on a console open on this machine. Without a token, the console answers
  only to loopback names (localhost, 127.0.0.1, [::1]): a site whose name is made to point at 127.0.0.1 (DNS
  rebinding) cannot read it either.
- **Uploads.** A body over the limit gets 413 with the limit in the message: at once when its Content-Length
  says so, or as soon as that many bytes have arrived.
"""

from __future__ import annotations

import hmac
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode, urlparse

from starlette.datastructures import URL, Headers
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "tunery_token"
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


class UploadTooLarge(Exception):
    """A request body passed the upload limit while it was being read."""

    def __init__(self, limit: int):
        super().__init__(too_large_message(limit))
        self.limit = limit


def too_large_message(limit: int) -> str:
    return (f"the file is larger than this console's upload limit of {human_bytes(limit)}; give its path on the "
            "server instead, or restart the console with a larger --upload-limit")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class Guard:
    """ASGI middleware: token, cross-site check, upload limit (see the module docstring)."""

    def __init__(self, app: ASGIApp, token: str | None, upload_limit: int):
        self.app, self.token, self.upload_limit = app, token, upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.token and not self._authorised(scope, headers):
            await _refuse(401, "401: this console needs its access token. Open the URL `tunery ui` printed "
                          "(it ends in ?token=...), or send the header 'Authorization: Bearer TOKEN'.")(scope, receive,
                                                                                                   send)
            return
        if not self.token and not _loopback_name(headers.get("host", "")):
            await _refuse(403, "403: without a token this console answers only to localhost and 127.0.0.1; open it "
                          "by that name, or restart it with --token")(scope, receive, send)
            return
        if self.token and _query_token(scope) and scope["method"] == "GET" and "text/html" in headers.get("accept", ""):
            await self._remember(scope, send)  # a page opened by its URL: the cookie keeps the token from now on
            return
        if scope["method"] in UNSAFE and _cross_site(headers):
            await _refuse(403, "403: a request from another site was refused; use the console itself")(scope, receive,
                                                                                                     send)
            return
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.upload_limit:
            await _refuse(413, "413: " + too_large_message(self.upload_limit))(scope, receive, send)
            return
        await self.app(scope, _counting(receive, self.upload_limit), send)

    def _authorised(self, scope: Scope, headers: Headers) -> bool:
        offered = [_query_token(scope), headers.get("authorization", "").removeprefix("Bearer ").strip()]
        cookie = SimpleCookie(headers.get("cookie", ""))
        if COOKIE in cookie:
            offered.append(cookie[COOKIE].value)
        return any(o and hmac.compare_digest(o.encode(), self.token.encode()) for o in offered)

    async def _remember(self, scope: Scope, send: Send) -> None:
        url = URL(scope=scope)
        query = urlencode([(k, v) for k, v in parse_qsl(url.query) if k != "token"])
        response = RedirectResponse(url.path + (f"?{query}" if query else ""), status_code=303)
        response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        await response(scope, _no_receive, send)


def _query_token(scope: Scope) -> str:
    return dict(parse_qsl(scope.get("query_string", b"").decode())).get("token", "")


def _loopback_name(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.strip("[]") in ("localhost", "127.0.0.1", "::1") or name.startswith("127.")


def _cross_site(headers: Headers) -> bool:
    origin = headers.get("origin")
    if not origin or origin == "null":
        return origin == "null"
    return urlparse(origin).netloc != headers.get("host", "")


def _refuse(status: int, text: str) -> PlainTextResponse:
    return PlainTextResponse(text, status_code=status)


def _counting(receive: Receive, limit: int) -> Receive:
    """`receive` that raises UploadTooLarge once the body passes `limit` bytes (a body sent without a length)."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise UploadTooLarge(limit)
        return message

    return wrapped


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
