""" "Did you mean" for names from a small known set: by meaning first (what users write for the
thing: done for succeeded, smtp for mailto), then by spelling. Pure; used by the rules and the
config checks.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence


def _words(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {word: meaning for meaning, words in table.items() for word in words}


# Words users write for an event type's last part (task.complete, job.done, error, ...).
EVENT_MEANINGS = _words(
    {
        "succeeded": ("complete", "completed", "completion", "done", "finish", "finished",
                      "success", "successful", "succeed", "succeded", "ok", "ready", "end"),
        "failed": ("error", "errored", "errors", "failure", "fail", "failing", "broken", "fault"),
        "cancelled": ("cancel", "canceled", "abort", "aborted", "stopped", "killed"),
        "started": ("start", "running", "run", "begin", "began", "processing", "in_progress"),
        "progress": ("progressing", "update", "updated", "percent"),
        "stalled": ("stuck", "stall", "hung", "hang", "timeout", "slow", "timedout"),
        "vanished": ("gone", "missing", "deleted", "lost", "disappeared", "vanish"),
        "submitted": ("submit", "queued", "queue", "created", "create", "new", "pending"),
        "modal": ("input", "waiting", "needs_input", "action_required"),
        "down": ("offline", "unreachable", "outage", "unavailable"),
        "up": ("online", "recovered", "back", "restored", "available"),
    }
)  # fmt: skip

# apprise schemes by what users write for the service.
SCHEME_MEANINGS = _words(
    {
        "mailto": ("smtp", "email", "mail", "e-mail"),
        "mailtos": ("smtps", "gmail"),
        "tgram": ("telegram", "tg"),
        "msteams": ("teams", "ms-teams", "microsoft-teams"),
        "pbul": ("pushbullet",),
        "pover": ("pushover",),
        "gchat": ("googlechat", "google-chat", "hangouts"),
        "wxteams": ("webex",),
    }
)

# Jinja filters by what users write for them.
FILTER_MEANINGS = _words(
    {
        "truncate": ("trunc", "shorten", "short", "cut", "limit", "ellipsis"),
        "datetime": ("date", "time", "strftime", "format_date", "timestamp", "dateformat"),
        "localtime": ("tz", "timezone", "local", "astimezone"),
        "duration": ("elapsed", "humanize", "seconds"),
        "oneline": ("single_line", "singleline", "strip_newlines", "flatten"),
        "tojson": ("json", "to_json", "dumps"),
        "upper": ("uppercase", "caps"),
        "lower": ("lowercase",),
        "length": ("len", "size"),
        "default": ("or", "fallback", "ifnone"),
    }
)


def _by_meaning(word: str, choices: Sequence[str], meanings: Mapping[str, str]) -> str | None:
    parts = re.split(r"([./_-])", word.lower())
    translated = "".join(meanings.get(part, part) for part in parts)
    whole = meanings.get(word.lower())
    for candidate in (whole, translated):
        if candidate is None:
            continue
        if candidate in choices:
            return candidate
        # `done` alone means task.succeeded: a choice whose last part is the meaning.
        last = re.split(r"[./]", candidate)[-1]
        ends = [c for c in choices if re.split(r"[./]", c)[-1] == last]
        if len(ends) == 1 or (ends and last != candidate):
            return ends[0]
    return None


def closest(word: str, choices: Sequence[str], meanings: Mapping[str, str] | None = None) -> str:
    """The choice `word` most likely meant, or ""."""
    if meanings and (found := _by_meaning(word, choices, meanings)):
        return found
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return close[0]
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    if "/" in word or any("/" in c for c in choices[:50]):
        # Area/City names (time zones): match the city, so Berln finds Europe/Berlin.
        tails = {c.rsplit("/", 1)[-1].lower(): c for c in choices}
        tail = word.rsplit("/", 1)[-1].lower()
        close = difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.75)
        if close:
            return tails[close[0]]
    return ""


def suggest(word: str, choices: Sequence[str], meanings: Mapping[str, str] | None = None) -> str:
    """` (did you mean 'X'?)` or ""."""
    found = closest(word, choices, meanings)
    return f" (did you mean '{found}'?)" if found else ""
