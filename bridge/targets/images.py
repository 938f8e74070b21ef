"""Targets stage, images: downloading a task's image to upload it with a message (chat targets,
apprise attachments). An imageUrl comes from the upstream, so it is untrusted: the download goes
only to public addresses (checked on the resolved address, which is the one connected to, again
after every redirect, at most 3), takes `image/*` only, and stops at a size cap. A
target or source with `allow_private_images: true` (a local simulator) lifts the address check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from yarl import URL

log = logging.getLogger("bridge.targets")

MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Image:
    """A downloaded image, to upload with the message."""

    name: str
    data: bytes
    content_type: str


def private(address: Address) -> bool:
    """Loopback, private, link-local (the cloud metadata services at 169.254.169.254 and
    fd00:ec2::254 among them), multicast, reserved or unspecified: not the open internet."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


class Refused(Exception):
    pass


async def _address(host: str, port: int, refused: Callable[[Address], bool]) -> str:
    """The address to connect to for `host`: itself when a literal, else the first of its
    resolved addresses, every one of which must pass `refused` (a name that also points inside is
    refused whole). The download then connects to exactly this address, so a name that resolves
    differently the second time (DNS rebinding) changes nothing."""
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if refused(literal):
            raise Refused("a private address")
        return host
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Refused(f"the name does not resolve ({exc.strerror or exc})") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses or any(refused(a) for a in addresses):
        raise Refused("a name that resolves to a private address")
    return str(addresses[0])


def _pinned(url: str, address: str) -> tuple[URL, str, str]:
    """`url` with its host replaced by `address`, the Host header and the TLS server name."""
    parsed = URL(url)
    host = parsed.raw_host or ""
    netloc = host if parsed.is_default_port() else f"{host}:{parsed.port}"
    if ":" in host:
        netloc = f"[{host}]" if parsed.is_default_port() else f"[{host}]:{parsed.port}"
    return parsed.with_host(address), netloc, host


async def fetch_image(
    session: aiohttp.ClientSession,
    url: str,
    name: str,
    *,
    max_bytes: int,
    deadline: aiohttp.ClientTimeout,
    allow_private: bool = False,
    refused: Callable[[Address], bool] = private,
) -> Image | None:
    """Download the image at `url` (at most `max_bytes`); None, logged, when it cannot be had.
    The URL is not logged: image links often carry signatures."""
    check: Callable[[Address], bool] = (lambda _: False) if allow_private else refused
    host = urlsplit(url).hostname or "?"
    try:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            host = parts.hostname or "?"
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise Refused("not an http(s) URL")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await _address(parts.hostname, port, check)
            pinned, netloc, server = _pinned(url, address)
            async with session.get(
                pinned,
                timeout=deadline,
                allow_redirects=False,
                headers={"Host": netloc},
                server_hostname=server if parts.scheme == "https" else None,
            ) as resp:
                if resp.status in _REDIRECTS and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    continue
                return await _read(resp, host, name, max_bytes)
        raise Refused(f"more than {MAX_REDIRECTS} redirects")
    except Refused as exc:
        log.warning("image from %s refused: %s; linking it instead", host, exc)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        log.warning(
            "image from %s could not be fetched (%s); linking it instead", host, type(exc).__name__
        )
    return None


async def _read(resp: aiohttp.ClientResponse, host: str, name: str, max_bytes: int) -> Image | None:
    if resp.status != 200:
        log.warning("image from %s: HTTP %d; linking it instead", host, resp.status)
        return None
    ctype = resp.content_type
    if not ctype.startswith("image/"):
        log.warning("image from %s is %s, not an image; linking it instead", host, ctype)
        return None
    if resp.content_length is not None and resp.content_length > max_bytes:
        log.warning("image from %s is over %d bytes; linking it instead", host, max_bytes)
        return None
    data = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > max_bytes:
            log.warning("image from %s is over %d bytes; linking it instead", host, max_bytes)
            return None
    ext = _EXTENSIONS.get(ctype, ctype.removeprefix("image/").split("+")[0] or "img")
    return Image(f"{name}.{re.sub(r'[^a-z0-9]', '', ext) or 'img'}", bytes(data), ctype)
