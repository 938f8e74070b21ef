"""The bridge's error tree. Third-party errors are translated at the boundary (`raise X from exc`).

    BridgeError
    ├── ConfigError            rules.yaml is invalid; carries every problem as FILE:LINE:COL lines
    ├── SourceError            one poll of an upstream failed; `reason` names the kind
    │                          (unreachable, timeout, auth_failed, not_a_task_api, bad_payload,
    │                          server_error, rate_limited, too_large, internal)
    ├── DeliveryError          a target refused or failed; `retryable` says whether to try again,
    │                          `retry_after` (seconds) when the target asked for a pause,
    │                          `deferred` when the target is fine and only wants it later
    └── StoreError             the database could not be opened, migrated, read or written;
                               `transient` when trying again may cure it (store/retry.py)

Messages never carry secrets: URLs go through `redact()` before they reach an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One config problem, pointing at the YAML node it is about."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class ConfigError(BridgeError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class SourceError(BridgeError):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class DeliveryError(BridgeError):
    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        deferred: bool = False,
    ) -> None:
        self.retryable = retryable or deferred
        self.retry_after = retry_after
        # Not a failure of the target (a chat edit coalesced with the next): it is not counted
        # against the target's health.
        self.deferred = deferred
        super().__init__(message)


class StoreError(BridgeError):
    """`transient`: the same call may succeed later (locked, busy, disk full, connection lost);
    the store retries those itself for a while before raising. `kind` names the trouble."""

    def __init__(self, message: str, *, transient: bool = False, kind: str = "error") -> None:
        self.transient = transient
        self.kind = kind
        super().__init__(message)


_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_URL_SECRET_PATH = re.compile(
    r"(?P<scheme>(?:slack|discord|tgram|pover|pushover|msteams|gotify|ntfy|matrix|"
    r"mattermost|rocket|zulip|json|xml|form)s?://)(?P<rest>[^\s?#]+)"
)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:token|key|secret|password|pass|apikey|api_key|access_token|signature)=)"
    # The value ends with the URL: at &, #, space, or the ), ',', ;, quotes or <> around it.
    r"(?P<value>[^&#\s),;'\"<>]+)",
    re.IGNORECASE,
)
# Discord webhook URLs and the API paths built from them (/api/v10/webhooks/ID/TOKEN/...).
_DISCORD_WEBHOOK = re.compile(r"(/webhooks/\d+/)[^/\s?#]+")
# Slack tokens: bot xoxb-, user xoxp-, app-level xapp-, and the other xox?- kinds.
_SLACK_TOKEN = re.compile(r"\b(xox[abeoprs]|xapp)-[A-Za-z0-9-]+")
_SLACK_HOOK = re.compile(r"(hooks\.slack\.com/services/)[^\s?#]+")
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide what looks like a credential in a URL or header: user:pass@, tokens in query strings,
    the token parts of chat webhook URLs (also as Discord API paths), Slack tokens, bearer tokens.
    Keeps the scheme and host readable."""
    text = _URL_USERINFO.sub(lambda m: m["scheme"] + "***@", text)
    text = _QUERY_SECRET.sub(lambda m: m["key"] + "***", text)
    text = _DISCORD_WEBHOOK.sub(r"\1***", text)
    text = _SLACK_HOOK.sub(r"\1***", text)
    text = _SLACK_TOKEN.sub(r"\1-***", text)
    text = _BEARER.sub(r"\1***", text)

    def _apprise_path(m: re.Match[str]) -> str:
        scheme, rest = m["scheme"], m["rest"]
        if scheme.startswith(("json", "xml", "form")):
            return scheme + rest  # a plain http endpoint: userinfo and query are handled above
        host, _, tail = rest.partition("/")
        return scheme + (host if not tail else host + "/***")

    return _URL_SECRET_PATH.sub(_apprise_path, text)


class Redactor:
    """Redacts known secret values (api keys, tokens, webhook secrets from the config) as well as
    URL-shaped credentials. The app builds one from the config and hands it to logging."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        self._secrets = sorted({s for s in (secrets or []) if s and len(s) >= 4}, key=len)[::-1]

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return redact(text)
