"""How a source's requests authenticate: the headers of each scheme, and the one-time search,
on the first 401/403, for a scheme the upstream accepts. Pipeline: **source** -> snapshot -> diff.
"""

from __future__ import annotations

import logging

import aiohttp

from bridge.sources.answers import JSON_TYPE

__all__ = ["AUTH_SCHEMES", "Auth", "auth_headers", "request_headers"]

log = logging.getLogger("bridge.sources")

AUTH_SCHEMES = ("mj-api-secret", "bearer", "raw")


def auth_headers(auth: str | None, api_key: str | None) -> dict[str, str]:
    """The request headers of one auth mode (None: mj-api-secret, which midjourney-proxy needs
    and trueai and new-api accept too); none without a key."""
    if not api_key:
        return {}
    match auth or "mj-api-secret":
        case "bearer":
            return {"Authorization": f"Bearer {api_key}"}
        case "mj-api-secret":
            return {"mj-api-secret": api_key}
        case "raw":
            return {"Authorization": api_key}
    return {}


def request_headers(auth: str | None, api_key: str | None) -> dict[str, str]:
    """What every request to the task API carries: Accept and the scheme's auth headers."""
    return {"Accept": JSON_TYPE, **auth_headers(auth, api_key)}


class Auth:
    """One source's auth. The other schemes are tried once, on the first 401/403: to adopt one
    when the config leaves `auth` out, or to name the one that works when the configured one
    does not (`hint()`, in the auth_failed error)."""

    def __init__(self, name: str, configured: str | None, api_key: str | None) -> None:
        self.name = name
        self._configured = configured
        self._key = api_key
        self.scheme = configured or AUTH_SCHEMES[0]
        self.headers = request_headers(configured, api_key)
        self._tried = not api_key or configured == "none"
        self._works: str | None = None  # the scheme found to work when another is configured

    def first_refusal(self, status: int) -> bool:
        """Whether this answer is the first 401/403, the one that starts the search (once)."""
        if status in (401, 403) and not self._tried:
            self._tried = True
            return True
        return False

    async def search(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        data: bytes | None,
        client_timeout: aiohttp.ClientTimeout,
    ) -> str | None:
        """After a 401/403: the first other scheme the server accepts, tried once each. Adopted
        (and returned) when the config left `auth` out; named in the error when it chose one."""
        for scheme in AUTH_SCHEMES:
            if scheme == self.scheme:
                continue
            headers = request_headers(scheme, self._key)
            extra = {} if data is None else {"Content-Type": JSON_TYPE}
            try:
                async with session.request(
                    method, url, data=data, headers={**headers, **extra}, timeout=client_timeout
                ) as response:
                    accepted = response.status not in (401, 403)
            except (TimeoutError, aiohttp.ClientError, OSError):
                return None  # the poll fails on its own request's answer
            if not accepted:
                continue
            if self._configured is None:
                log.info("%s: the upstream accepts auth %r (detected)", self.name, scheme)
                self.scheme, self.headers = scheme, headers
                return scheme
            self._works = scheme
            return None
        self._works = ""
        return None

    def hint(self) -> str:
        """What an auth_failed error advises, after what the search found."""
        if self._works:
            return (
                f"the key is refused with auth: {self.scheme} but accepted with auth: "
                f"{self._works}: set `auth: {self._works}` on source {self.name}"
            )
        if self._works == "":
            return f"the key is refused in every scheme ({', '.join(AUTH_SCHEMES)}): check api_key"
        return "check api_key and the auth mode"
