"""Logging set-up for every command: readable text by default (one line an entry), one JSON object
a line with `--log-format json`, and every record redacted before it is written (secrets never
reach logs). The bridge's own loggers get `-v`; the libraries' (aiosqlite's SQL, asyncpg,
aiohttp's access log, apprise) stay at warnings unless asked for with `-vv`."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from bridge.errors import Redactor

LogFormat = Literal["text", "json"]

#: Structured fields a record may carry (`log.info(..., extra=fields(target=..., attempt=...))`);
#: JSON lines carry them as keys, text lines keep them in the message.
FIELDS = ("source", "task", "event_id", "event_type", "target", "attempt", "delivery_id")
#: Libraries whose debug output is noise to an operator (aiosqlite logs every statement).
LIBRARIES = ("aiosqlite", "asyncpg", "aiohttp", "apprise", "asyncio", "urllib3")


def fields(
    *,
    source: str | None = None,
    task: str | None = None,
    event_id: str | None = None,
    event_type: str | None = None,
    target: str | None = None,
    attempt: int | None = None,
    delivery_id: str | None = None,
) -> dict[str, Any]:
    """The `extra=` of a log call: the fields given (one of FIELDS each), None left out."""
    values = {
        "source": source,
        "task": task,
        "event_id": event_id,
        "event_type": event_type,
        "target": target,
        "attempt": attempt,
        "delivery_id": delivery_id,
    }
    return {k: v for k, v in values.items() if v is not None}


# A URL's path and query, and an HTTP request line's target: where webhook URLs keep their tokens.
_URL_PATH = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s'\"<>]+)/[^\s'\"<>]*", re.IGNORECASE)
_REQUEST_LINE = re.compile(r"\b(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) /[^\s'\"]*")


def strip_paths(text: str) -> str:
    """`https://host/api/webhooks/1/TOKEN?x=y` -> `https://host/...`; `POST /a/b HTTP/1.1` ->
    `POST /... HTTP/1.1`. Applied to the libraries' records (apprise, urllib3, aiohttp): they print
    the URLs they call, and a webhook URL's path is a secret."""
    return _REQUEST_LINE.sub(r"\1 /...", _URL_PATH.sub(r"\1/...", text))


class RedactingFilter(logging.Filter):
    """Renders the message once, redacts it, and stores the result so handlers print it as is."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        if not (record.name == "bridge" or record.name.startswith("bridge.")):
            message = strip_paths(message)
        record.msg = self.redactor(message)
        record.args = None
        values = record.__dict__
        texts = [v for n in FIELDS if isinstance(v := values.get(n), str)]
        # One look at all the fields together; field by field only when something is hidden.
        if texts and self.redactor(joined := "\n".join(texts)) != joined:
            for name in FIELDS:
                if isinstance(value := values.get(name), str):
                    values[name] = self.redactor(value)
        return True


class QuietAppriseFilter(logging.Filter):
    """Drops apprise's records below ERROR at the bridge's handler. apprise logs every attempt and
    each failure as a warning; the bridge reports the outcome itself, with apprise's reason taken
    from that call's captured logs, so printing apprise's warning too would say it twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_apprise = record.name == "apprise" or record.name.startswith("apprise.")
        return not from_apprise or record.levelno >= logging.ERROR


def rfc3339(created: float) -> str:
    """`2026-12-01T05:39:54.123Z`: UTC, to the millisecond."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`05:39:54.123 INFO  bridge.deliver: ...` on one line: a message's line breaks (a traceback,
    a multi-line config error) are written as `\\n`, so one entry is one line to grep."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "").replace("\n", "\\n")


_filter = RedactingFilter(Redactor())


def setup(fmt: LogFormat = "text", verbosity: int = 0) -> None:
    """Configure the root logger once per process; `redact_with` can tighten it later.
    verbosity 0: info and up; 1 (`-v`): the bridge's debug lines too; 2 (`-vv`): the libraries'
    debug lines as well (aiosqlite's every statement, asyncpg, aiohttp, apprise)."""
    handler = logging.StreamHandler(sys.stderr)
    if verbosity < 2:
        handler.addFilter(QuietAppriseFilter())
    handler.addFilter(_filter)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    logging.getLogger("bridge").setLevel(logging.DEBUG if verbosity >= 1 else logging.NOTSET)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    # apprise's failure reasons reach a call's result.logs() only through its "apprise" logger,
    # which must let warnings through whatever the root level (an ERROR here loses them all);
    # the handler's QuietAppriseFilter keeps them off the operator's screen.
    if verbosity < 2:
        logging.getLogger("apprise").setLevel(logging.WARNING)


def redact_with(secrets: list[str]) -> Redactor:
    """From now on, also hide these configured values (api keys, tokens, URLs) in every record."""
    _filter.redactor = Redactor(secrets)
    return _filter.redactor
