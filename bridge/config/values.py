"""The values rules.yaml is made of, read strictly: durations, rates, booleans (YAML 1.2),
http(s) URLs that are never echoed, and the strict model base every section uses.
"""

from __future__ import annotations

import math
import re
from typing import Annotated
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def shown(value: object) -> str:
    """A value quoted for a message, cut short (the loader replaces values from `${VAR}`)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def parse_duration(value: object) -> float:
    """`250ms`, `5s`, `2m`, `1h`, `1d`, or a number of seconds -> seconds."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m[1]) * _UNITS[m[2]]
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        seconds = float(value)  # a bare number of seconds, e.g. from ${POLL:-5}
    if seconds is None and isinstance(value, str):
        raise ValueError(f"{shown(value)} is not a duration such as 250ms, 5s, 2m or 1h")
    if seconds is None:
        raise ValueError("expected a duration such as 250ms, 5s, 2m or 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative (write one such as 250ms, 5s or 2m)")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be finite (write one such as 250ms, 5s or 2m)")
    return seconds


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be more than 0, such as 250ms, 5s or 2m")
    return seconds


def parse_bool(value: object) -> bool:
    """true or false (YAML 1.2): yes/no/on/off are text, so they are refused rather than guessed;
    the text true/false (from `${VAR:-true}`) is read as the boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, str) and value.strip().lower() in ("yes", "no", "on", "off", "y", "n"):
        raise ValueError(
            "write true or false (this file is YAML 1.2, where yes, no, on and off are text)"
        )
    raise ValueError("write true or false")


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(ms|s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}


def parse_rate(value: object) -> tuple[int, float]:
    """`30/min` -> (30, 60.0): at most 30 sends per 60 seconds."""
    if isinstance(value, str) and (m := _RATE.match(value)):
        count = int(m[1])
        if count <= 0:
            raise ValueError("a rate needs at least 1 per period")
        return count, _RATE_UNITS[m[2]]
    if isinstance(value, str):
        raise ValueError(f"{shown(value)} is not a rate such as 30/min, 5/s or 100/h")
    raise ValueError("expected a rate such as 30/min, 5/s or 100/h")


def url_parts_problem(value: str) -> tuple[SplitResult | None, str | None]:
    """`value` split into its parts, or why it cannot be connected to: a malformed host or port,
    or no host. Never echoes the value: it may carry credentials."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:  # urlsplit's own words would quote the URL
        if "IPv6" in str(exc):
            return None, "has a malformed [IPv6] host (a bracket is missing or misplaced)"
        return None, "has an invalid port (expected a number from 1 to 65535)"
    if not parts.hostname:
        return None, "has no host"
    if port == 0:
        return None, "has an invalid port (expected a number from 1 to 65535)"
    return parts, None


def http_url_problem(value: str) -> str | None:
    """Why `value` is not an http(s) URL the bridge can connect to, or None."""
    if not re.match(r"^https?://[^\s/?#]+", value):
        return "must be an http:// or https:// URL"
    return url_parts_problem(value)[1]


def http_url(value: str) -> str:
    if problem := http_url_problem(value):
        raise ValueError(problem)
    return value


# An HTTP header name is an RFC 9110 token; a line break or NUL in a value would end the header
# and start another (request smuggling).
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
HEADER_BREAK = re.compile(r"[\r\n\x00]")


def header_problem(name: str, value: str) -> str | None:
    """Why a header cannot be sent as it is, or None. Never echoes the value (a token)."""
    if not HEADER_NAME.match(name):
        return f"header name {name!r} is not a valid HTTP header name"
    if HEADER_BREAK.search(value):
        return f"header {name}: its value holds a line break or NUL"
    return None


def http_headers(value: dict[str, str]) -> dict[str, str]:
    for name, text in value.items():
        if problem := header_problem(name, text):
            raise ValueError(problem)
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
# Intervals and timeouts where 0 makes no sense (`poll_interval: 0` would poll in a busy loop).
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
Bool = Annotated[bool, BeforeValidator(parse_bool)]
Rate = Annotated[tuple[int, float], BeforeValidator(parse_rate)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class KeyProblem(ValueError):
    """What a model's own check (one that needs several of its keys) finds wrong with one key:
    the loader reports it at that key's value, not at the model's mapping."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def url_secrets(url: str) -> list[str]:
    """A webhook or apprise URL whole, and its path and query: where such URLs keep their tokens,
    so they count as secrets wherever they appear (a library's log line shows them without the
    host). Short tails (`/hook`) carry no token and would only blot out ordinary words."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return [url, *(t for t in (tail, parts.query) if len(t) >= 8)]
