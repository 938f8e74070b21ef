"""Logging set-up for every command: readable text by default, one JSON object a line with
`--log-format json`, and every record redacted before it is written (secrets never reach logs)."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import orjson

from bridge.errors import Redactor

LogFormat = Literal["text", "json"]


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
        record.msg = self.redactor(message)
        record.args = None
        return True


class QuietAppriseFilter(logging.Filter):
    """Drops apprise's records below ERROR at the bridge's handler. apprise logs every attempt and
    each failure as a warning; the bridge reports the outcome itself, with apprise's reason taken
    from that call's captured logs, so printing apprise's warning too would say it twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_apprise = record.name == "apprise" or record.name.startswith("apprise.")
        return not from_apprise or record.levelno >= logging.ERROR


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        return orjson.dumps(entry).decode()


_filter = RedactingFilter(Redactor())


def setup(fmt: LogFormat = "text", level: int = logging.INFO) -> None:
    """Configure the root logger once per process; `redact_with` can tighten it later."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(QuietAppriseFilter())
    handler.addFilter(_filter)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # apprise's failure reasons reach a call's result.logs() only through its "apprise" logger,
    # which must let warnings through whatever the root level (an ERROR here loses them all);
    # the handler's QuietAppriseFilter keeps them off the operator's screen.
    logging.getLogger("apprise").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def redact_with(secrets: list[str]) -> Redactor:
    """From now on, also hide these configured values (api keys, tokens, URLs) in every record."""
    _filter.redactor = Redactor(secrets)
    return _filter.redactor
