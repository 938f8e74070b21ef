"""Templates: task text is data, never evaluated; filters; a default title and body per event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from bridge import templates
from bridge.config import Config
from bridge.models import EVENT_TYPES, Event
from bridge.rules import Router

T0 = datetime(2026, 11, 28, 13, 44, 14, tzinfo=UTC)
TASK: dict[str, Any] = {
    "id": "1748339029401828",
    "action": "IMAGINE",
    "status": "SUCCESS",
    "progress": "100%",
    "prompt": "dog playing ball --v 7",
    "submitTime": 1748339029401,
    "startTime": 1748339030665,
    "finishTime": 1748339112775,
    "imageUrl": "https://cdn.example.com/dog.png",
    "failReason": None,
}


def event(type_: str, task: dict[str, Any] | None = None, **data: Any) -> Event:
    if task is None and type_.startswith("task."):
        task = TASK
    return Event(
        id="evt_1",
        type=type_,
        source="mj",
        subject=(task or {}).get("id", "mj"),
        time=T0,
        task=task,
        previous={"status": "IN_PROGRESS", "progress": "45%"},
        data=data,
    )


def rendered(ev: Event, title: str | None = None, body: str | None = None) -> tuple[str, str]:
    rule = {"name": "r", "to": ["t"], "title": title, "body": body}
    config = Config.model_validate({"targets": {"t": "json://127.0.0.1:9"}, "rules": [rule]})
    delivery = Router(config).route([ev], T0.timestamp())[0]
    return delivery.title, delivery.body


INJECTIONS = [
    "{{ 7*7 }}",
    "{% for x in range(3) %}boom{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% raw %}",
    "{#",
    "${HOME}",
]


@pytest.mark.parametrize("prompt", INJECTIONS)
def test_task_text_is_shown_literally(prompt: str) -> None:
    ev = event("task.succeeded", {**TASK, "prompt": prompt, "failReason": prompt})
    title, body = rendered(ev)
    assert prompt in title
    assert f"Prompt: {prompt}" in body
    title, body = rendered(ev, "{{ task.prompt }}", "{{ task.failReason }}|{{ task.prompt }}")
    assert title == prompt
    assert body == f"{prompt}|{prompt}"


def test_sandbox_refuses_unsafe_templates_and_falls_back() -> None:
    ev = event("task.succeeded")
    title, body = rendered(ev, "{{ task.__class__.__mro__ }}x", "{{ task.update({'a': 1}) }}")
    assert title == "x"  # unsafe attributes are undefined
    assert body.startswith("Prompt: dog playing ball")  # refused at render: default body
    assert "a" not in TASK


def test_missing_fields_render_empty() -> None:
    ev = event("task.failed", {"id": "9"})
    title, body = rendered(ev, "[{{ task.nope }}][{{ task.properties.botType }}]", "{{ data.x }}")
    assert title == "[][]"
    assert body == ""
    title, body = rendered(ev)
    assert title == "❌ task failed: 9"
    assert body == "Task 9 on mj"


DURATIONS = [
    (0.25, "250ms"),
    (5.5, "5.5s"),
    (42, "42s"),
    (83, "1m 23s"),
    (3723, "1h 2m"),
    (200000, "2d 7h"),
    (0, "0ms"),
    (None, ""),
    ("83", "1m 23s"),
]


@pytest.mark.parametrize(("seconds", "text"), DURATIONS)
def test_duration(seconds: Any, text: str) -> None:
    assert templates.duration(seconds) == text


def test_took_is_submit_to_finish() -> None:
    assert templates.took(TASK) == "1m 23s"
    assert templates.took({**TASK, "finishTime": None}) == ""
    assert templates.took({"startTime": 1748339000000, "finishTime": 1748339060000}) == "1m"
    title, _ = rendered(event("task.succeeded"), "{{ task | took }}")
    assert title == "1m 23s"


TIMES = [
    ("{{ task.finishTime | localtime('Asia/Tokyo') }}", "2025-05-27 18:45:12 JST"),
    ("{{ task.finishTime | localtime('UTC', '%H:%M') }}", "09:45"),
    ("{{ task.finishTime | datetime('%H:%M %Z', 'Europe/Berlin') }}", "11:45 CEST"),
    ("{{ task.finishTime | datetime }}", "2025-05-27 09:45:12 UTC"),
    ("{{ event.time | localtime('America/New_York', '%d %b %H:%M') }}", "28 Nov 08:44"),
    ("{{ task.nothing | localtime('UTC') }}", ""),
]


@pytest.mark.parametrize(("source", "text"), TIMES)
def test_time_filters(source: str, text: str) -> None:
    assert rendered(event("task.succeeded"), source)[0] == text


DEFAULTS = [
    ("task.submitted", "📝 IMAGINE submitted: dog playing ball --v 7", ["Prompt:"]),
    ("task.modal", "✋ IMAGINE waits for input: dog playing ball --v 7", ["Status:"]),
    ("task.started", "▶️ IMAGINE started: dog playing ball --v 7", ["Task 1748339029401828"]),
    ("task.progress", "⏳ IMAGINE 100%: dog playing ball --v 7", ["Progress: 45% → 100%"]),
    (
        "task.succeeded",
        "✅ IMAGINE succeeded: dog playing ball --v 7",
        ["Image: https://cdn.example.com/dog.png", "Took: 1m 23s"],
    ),
    ("task.cancelled", "🚫 IMAGINE cancelled: dog playing ball --v 7", ["Prompt:"]),
    ("task.stalled", "🐢 IMAGINE stalled at 100%: dog playing ball --v 7", ["Status:"]),
    ("task.vanished", "👻 IMAGINE vanished: dog playing ball --v 7", ["Last seen: IN_PROGRESS"]),
    ("source.up", "🟢 source mj is up again", ["answers correctly again"]),
]


@pytest.mark.parametrize(("type_", "title", "phrases"), DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_default_texts(type_: str, title: str, phrases: list[str]) -> None:
    got_title, body = rendered(event(type_))
    assert got_title == title
    for phrase in phrases:
        assert phrase in body


def test_default_failed_and_down() -> None:
    failed = event("task.failed", {**TASK, "status": "FAILURE", "failReason": "banned prompt"})
    title, body = rendered(failed)
    assert title == "❌ IMAGINE failed: dog playing ball --v 7"
    assert "Reason: banned prompt" in body
    title, body = rendered(event("source.down", reason="auth_failed", message="HTTP 401"))
    assert title == "🔴 source mj is down: auth_failed"
    assert body.splitlines()[:2] == ["Reason: auth_failed", "HTTP 401"]


def test_every_event_type_has_a_default() -> None:
    assert set(templates.DEFAULT_TITLES) == set(EVENT_TYPES)
    assert set(templates.DEFAULT_BODIES) == set(EVENT_TYPES)
    title, _ = rendered(event("task.renamed"))  # a type from a newer bridge still renders
    assert title == "task.renamed: 1748339029401828"


def test_long_prompts_are_cut_in_titles() -> None:
    title, _ = rendered(event("task.succeeded", {**TASK, "prompt": "word " * 50}))
    assert len(title) < 100
    assert title.endswith("…")


def test_templates_compile_once() -> None:
    source = "{{ task.id }} compiled once"
    assert templates.compile_template(source) is templates.compile_template(source)


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("{{ x }", 1),
        ("a\n{% for %}", 2),
        ("{{ x | nofilter }}", 1),
        ("{{ x | localtime('No/Where') }}", 1),
    ],
)
def test_check_template(source: str, line: int) -> None:
    failure = templates.check_template(source)
    assert failure is not None
    assert failure[0] == line
    assert templates.check_template("{{ task.prompt | truncate(20) }}") is None


def test_a_failure_digest_gives_the_count_and_the_top_reasons() -> None:
    from dataclasses import dataclass

    from bridge.templates import DIGEST_LISTED, digest_text
    from tests.receiver import make_event

    @dataclass
    class Item:
        title: str
        body: str
        event: Event

    reasons = ["banned prompt"] * 7 + ["[Invalid parameter] Invalid aspect ratio"] * 3 + [None] * 2
    items = [
        Item(f"IMAGINE failed {n}", f"prompt {n}", make_event(n, "task.failed", failReason=r))
        for n, r in enumerate(reasons)
    ]
    title, body = digest_text(items)
    assert title == "12 tasks failed"
    top = body.split("\n\n")[0].splitlines()
    assert top == [
        "Top fail reasons:",
        "7x banned prompt",
        "3x [Invalid parameter] Invalid aspect ratio",
        "2x no reason given",
    ]
    assert "• IMAGINE failed 0\nprompt 0" in body
    many = digest_text(items * 3)[1]
    assert f"… and {36 - DIGEST_LISTED} more" in many
    assert many.count("• ") == DIGEST_LISTED


HOSTILE = [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("{{ 'a' * 10**9 }}", "repetition"),
    ("{{ 'a' | center(1000000000) }}", "center"),
    ("{{ '%999999999d' % 1 }}", "format width"),
    ("{{ '{:>999999999}'.format(1) }}", "format"),
    ("{{ 10 ** 100000 }}", "bits"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s | length }}", "concatenation"),
    ("{{ range(100000) | map('center', 60000) | join }}", "characters"),
    ("{{ range(20000) | map(attribute='real') | join('x' * 1000) }}", "join"),
    ("{{ ('a' * 100000) | replace('a', 'b' * 100) }}", "replace"),
    ("{{ 'x' | indent(10000000) }}", "indent"),
    ("{{ {'a': [1] * 1000} | tojson(indent=100000) }}", "tojson"),
    ("{{ (range(100000) | list) * 100 }}", "repetition"),
    ("{% macro f() %}{% for i in range(10000) %}" + "x" * 80 + "{% endfor %}{% endmacro %}"
     "{% set x = f() %}ok", "output"),
    ("{{ task.prompt * 10000 }}", "output exceeds"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "limit"), HOSTILE, ids=[s[:40] for s, _ in HOSTILE])
def test_a_hostile_template_stops_at_a_limit_and_its_delivery_is_a_dead_letter(
    source: str, limit: str
) -> None:
    """Each would pin the event loop or the memory for seconds to hours without the sandbox's
    budget; with it the rule's delivery carries the default text and the reason, to become a
    dead letter. `bridge check` accepts them (they compile) without folding anything."""
    assert templates.check_template(source) is None
    rule = {"name": "r", "to": ["t"], "body": source}
    config = Config.model_validate({"targets": {"t": "json://127.0.0.1:9"}, "rules": [rule]})
    delivery = Router(config).route([event("task.succeeded")], T0.timestamp())[0]
    assert delivery.error is not None
    assert delivery.error.startswith("rule 'r': template stopped: ")
    assert limit in delivery.error
    assert "Prompt: dog playing ball --v 7" in delivery.body  # the default body


def test_ordinary_templates_stay_within_the_limits() -> None:
    buttons = [{"label": f"U{i}"} for i in range(50)]
    task = {**TASK, "buttons": buttons, "prompt": "p" * 6000}
    source = (
        "{% for b in task.buttons %}{{ loop.index }}:{{ b.label | upper }} {% endfor %}"
        "{{ task.prompt | truncate(100) }} {{ task | tojson | length }} {{ range(500) | sum }}"
        "{{ '%5.1f' % 3.14159 }} {{ '{:>6}'.format(task.progress) }} {{ 2 ** 62 }}"
    )
    _, body = rendered(event("task.succeeded", task), body=source)
    assert body.startswith("1:U0 2:U1 ")
    assert "124750" in body
    assert "  3.1" in body


@pytest.mark.parametrize("when", [2**63 - 1, -(2**63), 1e300, "9" * 400, 10**30])
def test_times_beyond_the_calendar_render_empty(when: object) -> None:
    """A hostile finishTime once made even the default text fail (the fuzz test found it)."""
    task = {**TASK, "finishTime": when}
    assert templates.to_datetime(when) is None
    assert templates.took(task) == ""
    title, body = rendered(event("task.succeeded", task), body="{{ task.finishTime | datetime }}")
    assert title.startswith("✅ IMAGINE succeeded")
    assert body == ""
