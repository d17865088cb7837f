"""Who may talk to `adqueue serve`: the token, the Host header, and where a form was posted from.

- With a token, every request shows it: `Authorization: Bearer TOKEN`, or `?token=TOKEN` once,
  which sets a cookie (HttpOnly, SameSite=Strict) and redirects to the same URL without it, so the
  token stays out of links, history and Referer headers. The cookie holds a hash of the token,
  never the token itself.
- Without a token the server listens on the loopback interface only (the CLI refuses otherwise)
  and accepts only loopback Host names: a web page elsewhere cannot reach it by pointing a DNS
  name at 127.0.0.1 (DNS rebinding).
- A POST from another site's page is refused (cross-site request forgery of reviews): browsers
  name the requesting site in Sec-Fetch-Site, older ones in Origin.
Every response carries headers that keep the pages and images from being framed, sniffed or
mixed with anything from outside.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlencode, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

TOKEN_COOKIE = "adqueue_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no Referer leaves the server; its own forms keep their Origin
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
}


def cookie_value(token: str) -> str:
    return hashlib.sha256(f"adqueue-serve:{token}".encode()).hexdigest()


def _host_name(host_header: str) -> str:
    """The name part of a Host header: "127.0.0.1:8080" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    return (urlsplit(f"//{host_header}").hostname or "").lower()


class Guard(BaseHTTPMiddleware):
    def __init__(self, app: ASGIApp, *, token: str | None, allowed_hosts: Iterable[str] | None) -> None:
        super().__init__(app)
        self.token = token
        self.cookie = cookie_value(token) if token else None
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts is not None else None

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await self._check(request, call_next)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    async def _check(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        host = request.headers.get("host", "")
        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            return PlainTextResponse("unexpected Host header", status_code=400)
        if request.method not in ("GET", "HEAD") and not self._same_origin(request, host):
            return PlainTextResponse("cross-site request refused", status_code=403)
        if self.token is None:
            return await call_next(request)
        if self._bearer_ok(request) or self._cookie_ok(request):
            return await call_next(request)
        offered = request.query_params.get("token")
        if offered is not None and hmac.compare_digest(offered.encode(), self.token.encode()):
            if request.method in ("GET", "HEAD"):  # drop the token from the URL the browser shows
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                path = "/" + request.url.path.lstrip("/")  # never "//host": that would leave this server
                response: Response = RedirectResponse(path + (f"?{urlencode(rest)}" if rest else ""), status_code=303)
            else:
                response = await call_next(request)
            response.set_cookie(TOKEN_COOKIE, self.cookie or "", httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            return response
        return PlainTextResponse("401: this server needs its token: open it once with ?token=TOKEN "
                                 "(or send Authorization: Bearer TOKEN)", status_code=401,
                                 headers={"WWW-Authenticate": "Bearer"})

    def _bearer_ok(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), (self.token or "").encode())

    def _cookie_ok(self, request: Request) -> bool:
        value = request.cookies.get(TOKEN_COOKIE)
        return value is not None and hmac.compare_digest(value.encode(), (self.cookie or "").encode())

    @staticmethod
    def _same_origin(request: Request, host: str) -> bool:
        """Whether a write comes from this server's own pages. Browsers say so in Sec-Fetch-Site
        (all current ones) or Origin; a request with neither is not from a browser (curl, tests)."""
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            return site in ("same-origin", "none")  # "none": typed or bookmarked by the user
        origin = request.headers.get("origin")
        if origin is None:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()
