"""Rules stage: renders the title and body of a delivery. Jinja2 in an immutable sandbox with plain
text output; task text is data (a variable's value is never rendered again), so a prompt holding
`{{ 7*7 }}` is shown as written. Missing fields render empty instead of failing at send time.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import ChainableUndefined, Template, TemplateError, Undefined, nodes

from bridge.models import Event, iso
from bridge.sandbox import BoundedEnvironment, TemplateLimit

log = logging.getLogger(__name__)

DEFAULT_FORMAT = "%Y-%m-%d %H:%M:%S %Z"


def _missing(value: object) -> bool:
    return value is None or value == "" or isinstance(value, Undefined)


def duration(seconds: object) -> str:
    """Seconds -> `850ms`, `42s`, `1m 23s`, `2h 5m`, `3d 4h`."""
    if _missing(seconds):
        return ""
    try:
        total = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(seconds)
    if total < 0:
        return "-" + duration(-total)
    if total < 1:
        return f"{round(total * 1000)}ms"
    if total < 10 and total != int(total):
        return f"{total:.1f}s"
    rest = round(total)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    # Two units are enough to read at a glance: "2h 5m", not "2h 5m 13s".
    return " ".join(parts[:2]) or "0s"


def to_datetime(value: object) -> datetime | None:
    """Epoch millis (submitTime/finishTime), epoch seconds, ISO text or a datetime -> UTC."""
    if _missing(value) or isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        value = float(value)
    if isinstance(value, int | float):
        seconds = value / 1000 if value > 1e11 else value  # millis from 1973 on; seconds before
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (ValueError, OverflowError, OSError):  # beyond year 9999, or not finite
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        # Literal zone names are checked when the config loads; a computed one falls back to UTC.
        return ZoneInfo("UTC")


def format_datetime(value: object, fmt: str = DEFAULT_FORMAT, tz: str = "UTC") -> str:
    """`{{ task.finishTime | datetime('%H:%M', 'Europe/Berlin') }}`"""
    moment = to_datetime(value)
    if moment is None:
        return ""
    return moment.astimezone(_zone(tz)).strftime(fmt)


def localtime(value: object, tz: str = "UTC", fmt: str = DEFAULT_FORMAT) -> str:
    """`{{ task.finishTime | localtime('Asia/Tokyo') }}`"""
    return format_datetime(value, fmt, tz)


def took(task: object) -> str:
    """Submit-to-finish time of a task (`{{ task | took }}`); empty while unfinished."""
    if not isinstance(task, Mapping):
        return ""
    start = to_datetime(task.get("submitTime")) or to_datetime(task.get("startTime"))
    end = to_datetime(task.get("finishTime"))
    if start is None or end is None or end < start:
        return ""
    return duration((end - start).total_seconds())


def oneline(value: object) -> str:
    """Collapse whitespace and newlines: for titles."""
    return "" if _missing(value) else " ".join(str(value).split())


ENV = BoundedEnvironment(
    autoescape=False,
    undefined=ChainableUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)
ENV.policies["truncate.leeway"] = 0
ENV.filters.update(
    duration=duration,
    datetime=format_datetime,
    localtime=localtime,
    took=took,
    oneline=oneline,
)
ENV.bound_filters()
_TZ_ARG = {"localtime": 0, "datetime": 1}  # position of the zone among a filter's arguments


def check_template(source: str) -> tuple[int, str] | None:
    """None when `source` compiles; else (line inside the template, message)."""
    try:
        tree = ENV.parse(source)
        ENV.compile(tree)
    except TemplateError as exc:
        return getattr(exc, "lineno", None) or 1, str(exc.message or exc)
    for node in tree.find_all(nodes.Filter):
        index = _TZ_ARG.get(node.name)
        if index is None or len(node.args) <= index:
            continue
        arg = node.args[index]
        if isinstance(arg, nodes.Const) and isinstance(arg.value, str):
            try:
                ZoneInfo(arg.value)
            except (ZoneInfoNotFoundError, ValueError):
                return node.lineno, f"unknown time zone {arg.value!r} in the {node.name} filter"
    return None


@lru_cache(maxsize=1024)
def compile_template(source: str) -> Template:
    """Compiled once per distinct source; raises jinja2.TemplateError (caught by config checks)."""
    return ENV.from_string(source)


def context(event: Event, rule: str = "") -> dict[str, Any]:
    return {
        "event": {
            "id": event.id,
            "type": event.type,
            "source": event.source,
            "subject": event.subject,
            "time": iso(event.time),
        },
        "task": event.task or {},
        "previous": event.previous or {},
        "data": event.data,
        "rule": rule,
    }


def render(template: Template, ctx: Mapping[str, Any]) -> str:
    return template.render(ctx).strip()


# Default texts, one per event type, so a rule needs only `on` and `to`.
_WHAT = "{{ task.action or 'task' }}"
_ABOUT = (
    "{{ (task.prompt or task.promptEn or task.description or event.subject)"
    " | oneline | truncate(60, True, '…') }}"
)


def _title(emoji: str, verb: str) -> str:
    return f"{emoji} {_WHAT} {verb}: {_ABOUT}"


DEFAULT_TITLES: dict[str, str] = {
    "task.submitted": _title("📝", "submitted"),
    "task.modal": _title("✋", "waits for input"),
    "task.started": _title("▶️", "started"),
    "task.progress": _title("⏳", "{{ task.progress }}"),
    "task.succeeded": _title("✅", "succeeded"),
    "task.failed": _title("❌", "failed"),
    "task.cancelled": _title("🚫", "cancelled"),
    "task.stalled": _title("🐢", "stalled{% if task.progress %} at {{ task.progress }}{% endif %}"),
    "task.vanished": _title("👻", "vanished"),
    "source.down": "🔴 source {{ event.source }} is down: {{ data.reason or 'unknown reason' }}",
    "source.up": "🟢 source {{ event.source }} is up again",
}
FALLBACK_TITLE = "{{ event.type }}: {{ event.subject }}"


def _line(condition: str, text: str) -> str:
    return f"{{% if {condition} %}}{text}\n{{% endif %}}"


_PROMPT = _line("task.prompt", "Prompt: {{ task.prompt | truncate(1000, True, '…') }}")
_STATUS = _line(
    "task.status",
    "Status: {{ task.status }}{% if task.progress %} ({{ task.progress }}){% endif +%}",
)
_TOOK = _line("task | took", "Took: {{ task | took }}")
_TRAILER = "Task {{ task.id or event.subject }} on {{ event.source }}"

DEFAULT_BODIES: dict[str, str] = {
    "task.submitted": _PROMPT + _TRAILER,
    "task.modal": _PROMPT + _STATUS + _TRAILER,
    "task.started": _PROMPT + _TRAILER,
    "task.progress": _PROMPT
    + _line(
        "task.progress",
        "Progress: {% if previous.progress %}{{ previous.progress }} → {% endif %}"
        "{{ task.progress }}",
    )
    + _line("task.imageUrl", "Preview: {{ task.imageUrl }}")
    + _TRAILER,
    "task.succeeded": _PROMPT
    + _line("task.imageUrl", "Image: {{ task.imageUrl }}")
    + _TOOK
    + _TRAILER,
    "task.failed": _PROMPT
    + _line("task.failReason", "Reason: {{ task.failReason }}")
    + _TOOK
    + _TRAILER,
    "task.cancelled": _PROMPT + _TOOK + _TRAILER,
    "task.stalled": _PROMPT + _STATUS + _TRAILER,
    "task.vanished": _PROMPT
    + _line("previous.status", "Last seen: {{ previous.status }}")
    + "The task left the list and fetching it by id found nothing.\n"
    + _TRAILER,
    "source.down": "Reason: {{ data.reason or 'unknown' }}\n"
    + _line("data.message or data.error", "{{ data.message or data.error }}")
    + "Events from {{ event.source }} wait until it answers again.",
    "source.up": "Source {{ event.source }} answers correctly again.",
}
FALLBACK_BODY = "{{ event.type }} {{ event.subject }} on {{ event.source }}"


def default_title(event_type: str) -> str:
    return DEFAULT_TITLES.get(event_type, FALLBACK_TITLE)


def default_body(event_type: str) -> str:
    return DEFAULT_BODIES.get(event_type, FALLBACK_BODY)


def render_text(source: str, ctx: Mapping[str, Any], fallback: str) -> str:
    """Render `source`; a template that fails at render time (a sandbox refusal, a filter that
    chokes on odd data) falls back to the default text rather than losing the notification.
    One that goes over a limit of the sandbox (TemplateLimit) is not hidden: it is raised, and
    the rule's delivery becomes a dead letter that says so."""
    try:
        return render(compile_template(source), ctx)
    except TemplateLimit:
        raise
    except Exception as exc:
        log.warning("template failed, using the default text: %s", type(exc).__name__)
    try:
        return render(compile_template(fallback), ctx)
    except Exception as exc:  # the default text met data it cannot show: say what happened
        log.warning("default text failed too, using the bare event: %s", type(exc).__name__)
        event = ctx.get("event") or {}
        return f"{event.get('type', 'event')} {event.get('subject', '')}".strip()


# -- digests ------------------------------------------------------------------------------------

DIGEST_TITLE_MAX = 200
DIGEST_LISTED = 20  # items a digest lists one by one; the rest are counted
DIGEST_REASONS = 5  # fail reasons a digest names, most frequent first


class Digested(Protocol):
    """One delivery of a digest group, as rendered for its rule (an OutboxItem)."""

    @property
    def title(self) -> str: ...

    @property
    def body(self) -> str: ...

    @property
    def event(self) -> Event: ...


def digest_text(items: Sequence[Digested]) -> tuple[str, str]:
    """Title and body of the one message standing for a digest group's deliveries: the count,
    the most frequent fail reasons when tasks failed, then the items (the first DIGEST_LISTED)."""
    failed = [i for i in items if i.event.type == "task.failed"]
    if failed and len(failed) == len(items):
        title = f"{len(items)} tasks failed"
    else:
        title = f"{len(items)} tasks: " + "; ".join(dict.fromkeys(i.title for i in items))
    if len(title) > DIGEST_TITLE_MAX:
        title = title[: DIGEST_TITLE_MAX - 1] + "…"
    parts: list[str] = []
    if failed:
        reasons = Counter(
            oneline((i.event.task or {}).get("failReason")) or "no reason given" for i in failed
        )
        top = [f"{n}x {reason}" for reason, n in reasons.most_common(DIGEST_REASONS)]
        if len(reasons) > DIGEST_REASONS:
            top.append(f"and {len(reasons) - DIGEST_REASONS} other reasons")
        parts.append("Top fail reasons:\n" + "\n".join(top))
    parts += [f"• {i.title}\n{i.body}".rstrip() for i in items[:DIGEST_LISTED]]
    if len(items) > DIGEST_LISTED:
        parts.append(f"… and {len(items) - DIGEST_LISTED} more")
    return title, "\n\n".join(parts)
