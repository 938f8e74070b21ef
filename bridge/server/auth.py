"""Who may use the operator surfaces. `server.auth` names a bearer token and/or users with hashed
passwords; a browser logs in once (`/login`) and holds a session cookie with its own CSRF token.
Handlers say what they need with `@operator` (JSON APIs: 401) or `@operator(page=True)` (pages:
to the login form); `csrf_ok()` guards every state-changing form post. Without `server.auth`
(the loopback default) everyone who reaches the server is an operator, and sessions exist only
to carry CSRF tokens. Also here: the Host allow-list (DNS rebinding) and the cross-site check."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import overload
from urllib.parse import parse_qsl, quote, urlsplit

from aiohttp import web

from bridge.config import check_password
from bridge.server.edge import SERVED, BodyRefused, read_body, refuse

log = logging.getLogger("bridge.server.auth")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SESSION_COOKIE = "bridge_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000
ANYONE = "anyone"  # the operator's name when there is no server.auth
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # never behind auth or the Host check


@dataclass(slots=True)
class Session:
    id: str
    user: str | None  # None: a visitor without login (only while there is no server.auth)
    csrf: str
    expires: float


class Sessions:
    """In memory, per process (a restart logs everyone out), at most MAX_SESSIONS."""

    def __init__(self) -> None:
        self._all: OrderedDict[str, Session] = OrderedDict()

    def create(self, user: str | None) -> Session:
        session = Session(
            secrets.token_urlsafe(32),
            user,
            secrets.token_urlsafe(32),
            time.time() + SESSION_SECONDS,
        )
        self._all[session.id] = session
        while len(self._all) > MAX_SESSIONS:
            self._all.popitem(last=False)
        return session

    def get(self, session_id: str) -> Session | None:
        session = self._all.get(session_id)
        if session is None:
            return None
        if session.expires < time.time():
            del self._all[session_id]
            return None
        return session

    def drop(self, session_id: str) -> None:
        self._all.pop(session_id, None)


SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions")
OPERATOR: web.RequestKey[str] = web.RequestKey("operator", str)  # who, once `@operator` let them in
_NEW_SESSION: web.RequestKey[Session] = web.RequestKey("new-session", Session)


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def session_of(request: web.Request) -> Session | None:
    cookie = request.cookies.get(SESSION_COOKIE)
    return request.app[SESSIONS].get(cookie) if cookie else None


def operator_of(request: web.Request) -> str | None:
    """Who the caller is as an operator: `ANYONE` without server.auth, `token` for the bearer
    token, a user's name for a logged-in session; None when unauthenticated."""
    auth = request.app[SERVED].config.auth
    if auth is None:
        return ANYONE
    header = request.headers.get("Authorization", "")
    if auth.token and header[:7].lower() == "bearer " and same(header[7:].strip(), auth.token):
        return "token"
    session = session_of(request)
    return session.user if session is not None else None


@overload
def operator(handler: Handler) -> Handler: ...
@overload
def operator(*, page: bool = False) -> Callable[[Handler], Handler]: ...
def operator(
    handler: Handler | None = None, *, page: bool = False
) -> Handler | Callable[[Handler], Handler]:
    """Let only operators in. A JSON API answers 401 (`WWW-Authenticate: Bearer`); a page
    (`page=True`) sends a browser to the login form and back."""

    def wrap(inner: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            who = operator_of(request)
            if who is None:
                if page and request.method == "GET":
                    raise web.HTTPSeeOther(location=f"/login?next={quote(request.path_qs)}")
                response = refuse(401, "log in, or send Authorization: Bearer TOKEN")
                response.headers["WWW-Authenticate"] = 'Bearer realm="mj-bridge"'
                return response
            request[OPERATOR] = who
            return await inner(request)

        guarded.__name__ = inner.__name__
        guarded.__doc__ = inner.__doc__
        return guarded

    return wrap(handler) if handler is not None else wrap


def csrf_token(request: web.Request) -> str:
    """The CSRF token of the caller's session, for a page's forms. Without server.auth a visitor
    gets a session here; `keep_session` then sets its cookie on the page."""
    session = session_of(request)
    if session is None:
        session = request.app[SESSIONS].create(None)
        request[_NEW_SESSION] = session
    return session.csrf


def keep_session(request: web.Request, response: web.StreamResponse) -> None:
    if (session := request.get(_NEW_SESSION)) is not None:
        set_session_cookie(request, response, session)


def set_session_cookie(
    request: web.Request, response: web.StreamResponse, session: Session
) -> None:
    # Secure when the browser came through the https public_url (a TLS proxy); not when it calls
    # the listen address directly over http, where a Secure cookie would be dropped.
    public = urlsplit(request.app[SERVED].public_url)
    secure = public.scheme == "https" and request.host.lower() == public.netloc.lower()
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        httponly=True,
        samesite="Strict",
        path="/",
        secure=secure,
        max_age=SESSION_SECONDS,
    )


def csrf_ok(request: web.Request, given: str) -> str | None:
    """Why a state-changing browser request is refused, or None. A bearer-token caller is not a
    browser riding on a cookie and needs no CSRF token."""
    if operator_of(request) == "token":
        return None
    if (why := cross_site(request)) is not None:
        return f"cross-site request refused ({why})"
    session = session_of(request)
    if session is None or not same(given, session.csrf):
        return "missing or stale CSRF token: reload the page"
    return None


def cross_site(request: web.Request) -> str | None:
    """Why a request looks like it comes from another site's page, or None."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {fetch_site}"
    origin = request.headers.get("Origin")
    if origin is not None:
        own = {f"{request.scheme}://{request.host}".lower()}
        public = request.app[SERVED].public_url
        if public:
            parts = urlsplit(public)
            own.add(f"{parts.scheme}://{parts.netloc}".lower())
        if origin.lower() not in own:
            return "foreign Origin"
    return None


# -- the Host allow-list ----------------------------------------------------------------------


def host_allowed(host: str, names: frozenset[str]) -> bool:
    """IP literals and the configured names only: a DNS-rebinding page calls the bridge by a
    name of the attacker's, which is not among them."""
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:
        return False
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name.lower() in names


@web.middleware
async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in OPEN_PATHS:
        names = request.app[SERVED].hosts
        if not host_allowed(request.headers.get("Host", ""), names):
            log.warning("refused a request for a host name this server does not answer to")
            return refuse(421, "unknown Host: set server.public_url to the name used to reach me")
    return await handler(request)


# -- login and logout -------------------------------------------------------------------------


def next_path(target: str) -> str:
    """Only a path on this server: never an open redirect."""
    return target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/"


async def login(request: web.Request) -> web.StreamResponse:
    auth = request.app[SERVED].config.auth
    if auth is None:
        raise web.HTTPSeeOther(location="/")
    if (why := cross_site(request)) is not None:
        raise web.HTTPForbidden(text=f"cross-site request refused ({why})\n")
    try:
        form = await _form(request)
    except BodyRefused as exc:
        return exc.answer()
    target = next_path(form.get("next", "/"))
    async with request.app[SERVED].checking:
        user = await _verify(form, auth.users, auth.token)
    if user is None:
        log.warning("a failed login from %s", request.remote)
        raise web.HTTPSeeOther(location=f"/login?failed=1&next={quote(target)}")
    sessions = request.app[SESSIONS]
    if (old := request.cookies.get(SESSION_COOKIE)) is not None:
        sessions.drop(old)  # a fresh id at login: a planted cookie learns nothing
    session = sessions.create(user)
    log.info("%s logged in from %s", user, request.remote)
    response = web.HTTPSeeOther(location=target)
    set_session_cookie(request, response, session)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    try:
        form = await _form(request)
    except BodyRefused as exc:
        return exc.answer()
    if csrf_ok(request, form.get("csrf", "")) is None and (s := session_of(request)) is not None:
        request.app[SESSIONS].drop(s.id)
    response = web.HTTPSeeOther(location="/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


async def _form(request: web.Request) -> dict[str, str]:
    body = await read_body(request, 16 * 1024)
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def _verify(form: dict[str, str], users: dict[str, str], token: str | None) -> str | None:
    given_token = form.get("token", "")
    if token and given_token:
        return "token" if same(given_token, token) else None
    name, password = form.get("user", ""), form.get("password", "")
    hashed = users.get(name)
    if hashed is None or not password:
        return None
    ok = await asyncio.to_thread(check_password, password, hashed)
    return name if ok else None
