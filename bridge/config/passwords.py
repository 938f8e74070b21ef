"""Passwords of `server.auth.users`, hashed with scrypt (hashlib's, RFC 7914) as
`scrypt$N$r$p$SALT$HASH` (base64); `bridge hash-password` makes them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

# 16 MiB and about 50 ms a check: the "interactive login" parameters of the scrypt paper.
N, R, P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, maxmem=_MAXMEM)
    b64 = base64.b64encode
    return f"scrypt${N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def _parts(hashed: str) -> tuple[int, int, int, bytes, bytes]:
    name, n, r, p, salt, digest = hashed.split("$")
    if name != "scrypt":
        raise ValueError(name)
    numbers = int(n), int(r), int(p)
    if not (2 <= numbers[0] <= 2**20 and numbers[0] & (numbers[0] - 1) == 0):
        raise ValueError(n)
    if not (1 <= numbers[1] <= 32 and 1 <= numbers[2] <= 16):
        raise ValueError(r)
    raw = base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
    if len(raw[0]) < 8 or len(raw[1]) < 16:
        raise ValueError(salt)
    return (*numbers, *raw)


def password_problem(hashed: str) -> str | None:
    """Why `hashed` is not a password hash this bridge can check (never echoes it), or None."""
    try:
        _parts(hashed)
    except (ValueError, binascii.Error):
        return "not a password hash: make one with `bridge hash-password`"
    return None


def check_password(password: str, hashed: str) -> bool:
    """Whether `password` matches; constant time in the comparison. Blocking (~50 ms)."""
    n, r, p, salt, digest = _parts(hashed)
    given = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(digest)
    )
    return hmac.compare_digest(given, digest)
