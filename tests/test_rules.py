"""Routing: matchers as tables, stop, one delivery per (event, target), throttle and digest
windows driven by a controllable clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.config import Config, RuleConfig
from bridge.models import Event, delivery_id
from bridge.rules import Router, parse_matcher, parse_path

T0 = 1_800_000_000.0
TASK: dict[str, Any] = {
    "id": "1748339029401828",
    "action": "IMAGINE",
    "status": "FAILURE",
    "progress": "100%",
    "prompt": "dog playing ball --v 7",
    "failReason": "[Invalid parameter] Invalid aspect ratio",
    "submitTime": 1748339029401,
    "finishTime": 1748339072775,
    "seed": 42,
    "isCompleted": True,
    "properties": {"botType": "MID_JOURNEY", "nonce": "1648407736855097344"},
    "buttons": [{"label": "U1"}, {"label": "V1"}],
}


def event(
    type_: str = "task.failed",
    task: dict[str, Any] | None = None,
    *,
    source: str = "mj",
    subject: str | None = None,
    at: float = T0,
    data: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
) -> Event:
    if task is None and type_.startswith("task."):
        task = TASK
    subject = subject or (task or {}).get("id") or source
    return Event(
        id=f"evt_{type_}_{subject}_{at}",
        type=type_,
        source=source,
        subject=subject,
        time=datetime.fromtimestamp(at, UTC),
        task=task,
        previous=previous,
        data=data or {},
    )


def config(*rules: dict[str, Any]) -> Config:
    return Config.model_validate(
        {
            "targets": {t: f"json://127.0.0.1:9/{t}" for t in ("a", "b", "c")},
            "rules": [{"to": ["a"], **r} for r in rules],
        }
    )


def matches(rule: dict[str, Any], ev: Event) -> bool:
    return bool(Router(config({"name": "r", **rule})).route([ev], T0))


WHEN = [
    # exact values, compared as text
    ({"action": "IMAGINE"}, TASK, True),
    ({"action": "UPSCALE"}, TASK, False),
    ({"progress": "100%"}, TASK, True),
    ({"seed": 42}, TASK, True),
    ({"seed": "42"}, TASK, True),
    ({"isCompleted": True}, TASK, True),
    ({"isCompleted": "true"}, TASK, True),
    ({"isCompleted": False}, TASK, False),
    # any-of lists
    ({"action": ["BLEND", "IMAGINE"]}, TASK, True),
    ({"action": ["BLEND", "UPSCALE"]}, TASK, False),
    # /regex/flags, searched
    ({"failReason": "/Invalid/"}, TASK, True),
    ({"failReason": "/invalid aspect/"}, TASK, False),
    ({"failReason": "/INVALID ASPECT/i"}, TASK, True),
    ({"failReason": "/^invalid/"}, TASK, False),
    ({"failReason": "/banned|aspect/"}, TASK, True),
    ({"prompt": "/^dog/"}, TASK, True),
    ({"action": ["UPSCALE", "/^IMAG/"]}, TASK, True),
    # dotted paths, into objects and lists
    ({"properties.botType": "MID_JOURNEY"}, TASK, True),
    ({"properties.botType": "NIJI_JOURNEY"}, TASK, False),
    ({"properties.missing": "x"}, TASK, False),
    ({"buttons.label": "V1"}, TASK, True),
    ({"task.properties.nonce": "/^1648/"}, TASK, True),
    ({"task.customField": "x"}, {**TASK, "customField": "x"}, True),
    # null: absent or null
    ({"imageUrl": None}, TASK, True),
    ({"failReason": None}, TASK, False),
    # every key must hold
    ({"action": "IMAGINE", "failReason": "/aspect/"}, TASK, True),
    ({"action": "IMAGINE", "failReason": "/banned/"}, TASK, False),
    # event keys
    ({"source": "mj"}, TASK, True),
    ({"source": ["other", "/^m/"]}, TASK, True),
    ({"source": "other"}, TASK, False),
    ({"type": "task.failed"}, TASK, True),
    ({"previous.status": "IN_PROGRESS"}, TASK, True),
]


@pytest.mark.parametrize(("when", "task", "expected"), WHEN, ids=[str(w[0]) for w in WHEN])
def test_when(when: dict[str, Any], task: dict[str, Any], expected: bool) -> None:
    ev = event("task.failed", task, previous={"status": "IN_PROGRESS"})
    assert matches({"when": when}, ev) is expected


ON = [
    (["task.failed"], "task.failed", True),
    (["task.succeeded"], "task.failed", False),
    (["task.*"], "task.failed", True),
    (["task.*"], "source.down", False),
    (["*"], "source.down", True),
    (["task.s*"], "task.stalled", True),
    (["task.succeeded", "task.failed"], "task.failed", True),
    ("task.failed", "task.failed", True),
]


@pytest.mark.parametrize(("on", "type_", "expected"), ON, ids=[f"{o}-{t}" for o, t, _ in ON])
def test_on(on: Any, type_: str, expected: bool) -> None:
    assert matches({"on": on}, event(type_)) is expected


def test_source_events_skip_task_conditions() -> None:
    down = event("source.down", data={"reason": "auth_failed"})
    assert not matches({"when": {"action": "IMAGINE"}}, down)
    assert matches({"on": "source.*", "when": {"source": "mj"}}, down)
    assert matches({"on": "source.down", "when": {"data.reason": "auth_failed"}}, down)
    assert not matches({"on": "source.down", "when": {"data.reason": "unreachable"}}, down)


def test_stop_hides_the_event_from_later_rules() -> None:
    router = Router(
        config(
            {"name": "mute-progress", "on": "task.progress", "to": [], "stop": True},
            {"name": "all", "on": "*", "to": ["a"]},
        )
    )
    assert router.route([event("task.progress")], T0) == []
    assert [d.rule for d in router.route([event("task.failed")], T0)] == ["all"]


def test_one_delivery_per_event_and_target_first_rule_wins() -> None:
    router = Router(
        config(
            {"name": "first", "on": "task.failed", "to": ["a", "b"], "title": "first"},
            {"name": "second", "on": "*", "to": ["b", "c"], "title": "second"},
        )
    )
    ev = event()
    deliveries = router.route([ev], T0)
    assert [(d.target, d.rule, d.title) for d in deliveries] == [
        ("a", "first", "first"),
        ("b", "first", "first"),
        ("c", "second", "second"),
    ]
    assert [d.id for d in deliveries] == [delivery_id(ev.id, t) for t in ("a", "b", "c")]


def test_throttle_per_rule_and_task() -> None:
    router = Router(config({"name": "p", "on": "task.progress", "throttle": "1m"}))
    one, other = event("task.progress"), event("task.progress", {**TASK, "id": "2"})
    assert len(router.route([one], T0)) == 1
    assert router.route([one], T0 + 30) == []  # same task inside the window
    assert len(router.route([other], T0 + 30)) == 1  # another task has its own window
    assert router.route([one], T0 + 59.9) == []
    assert len(router.route([one], T0 + 60)) == 1  # window over
    assert router.route([one], T0 + 61) == []


def test_throttle_uses_the_clock_when_no_time_is_given() -> None:
    now = [T0]
    router = Router(config({"name": "p", "throttle": "10s"}), clock=lambda: now[0])
    assert len(router.route([event()])) == 1
    now[0] += 5
    assert router.route([event()]) == []
    now[0] += 5
    assert len(router.route([event()])) == 1


def test_digest_groups_share_a_key_and_a_due_time() -> None:
    router = Router(
        config(
            {
                "name": "digest",
                "on": "task.failed",
                "to": ["a"],
                "group": {"by": ["source", "action"], "wait": "30s"},
            }
        )
    )
    first = router.route([event(at=T0)], T0)[0]
    second = router.route([event(task={**TASK, "id": "2"}, at=T0 + 10)], T0 + 10)[0]
    upscale = router.route([event(task={**TASK, "action": "UPSCALE"}, at=T0 + 12)], T0 + 12)[0]
    late = router.route([event(task={**TASK, "id": "3"}, at=T0 + 31)], T0 + 31)[0]
    assert first.group == second.group == "digest|source=mj|action=IMAGINE"
    assert upscale.group == "digest|source=mj|action=UPSCALE"
    due = datetime.fromtimestamp(T0 + 30, UTC)
    assert first.not_before == second.not_before == due  # one window: sent as one digest
    assert upscale.not_before == datetime.fromtimestamp(T0 + 42, UTC)
    assert late.group == first.group
    assert late.not_before == datetime.fromtimestamp(T0 + 61, UTC)  # a new window


def test_no_group_means_no_delay() -> None:
    delivery = Router(config({"name": "r"})).route([event()], T0)[0]
    assert delivery.group is None
    assert delivery.not_before is None


def test_cancel_is_kept() -> None:
    assert config({"name": "r", "cancel": True}).rules[0].cancel is True
    assert isinstance(config({"name": "r"}).rules[0], RuleConfig)


def test_explain_gives_the_first_failing_condition_and_leaves_state_alone() -> None:
    router = Router(
        config(
            {"name": "ok", "on": "task.failed", "throttle": "1h", "stop": True},
            {"name": "after", "on": "*"},
            {"name": "succ", "on": "task.succeeded"},
        )
    )
    ev = event()
    for _ in range(2):  # explain never consumes the throttle
        found = router.explain(ev)
        assert [(m.rule, m.matched) for m in found] == [
            ("ok", True),
            ("after", False),
            ("succ", False),
        ]
    assert "stop" in found[1].reason
    assert len(router.route([ev], T0)) == 1

    found = Router(config({"name": "w", "when": {"action": "UPSCALE", "seed": 1}})).explain(ev)
    assert found[0].reason == "when action: has 'IMAGINE', wanted 'UPSCALE'"
    found = Router(config({"name": "o", "on": ["task.succeeded"]})).explain(ev)
    assert found[0].reason == "on [task.succeeded] does not include task.failed"


@pytest.mark.parametrize(
    "key", ["action", "properties.botType", "task.x", "previous.status", "data.reason", "source"]
)
def test_paths_parse(key: str) -> None:
    assert parse_path(key).key == key


@pytest.mark.parametrize("key", ["failreason", "props.x", "action..x", "previous"])
def test_bad_paths(key: str) -> None:
    with pytest.raises(ValueError, match=r"task field|field path"):
        parse_path(key)


@pytest.mark.parametrize("value", ["/(/", "/x/q", {"a": 1}])
def test_bad_matchers(value: Any) -> None:
    with pytest.raises(ValueError, match=r"regex|value"):
        parse_matcher(value)


def test_group_interval_sends_at_most_one_message_per_interval() -> None:
    router = Router(
        config(
            {
                "name": "failures",
                "on": "task.failed",
                "to": ["a"],
                "group": {"by": ["source"], "wait": "30s", "interval": "5m"},
            }
        )
    )

    def due(n: int, at: float) -> datetime | None:
        task = {**TASK, "id": str(n)}
        return router.route([event(task=task, at=at)], at)[0].not_before

    assert due(1, T0) == due(2, T0 + 20) == datetime.fromtimestamp(T0 + 30, UTC)  # group_wait
    # After the first message, the next waits for group_interval from it, not group_wait.
    assert due(3, T0 + 40) == due(4, T0 + 200) == datetime.fromtimestamp(T0 + 330, UTC)
    # A group quiet for longer than the interval starts again with group_wait.
    assert due(5, T0 + 1000) == datetime.fromtimestamp(T0 + 1030, UTC)


def test_route_explain_and_cancels_agree_and_cancels_respect_the_throttle() -> None:
    now = [T0]
    router = Router(
        config(
            {"name": "first", "on": "task.failed", "to": ["b"]},
            {"name": "cancel", "on": "task.stalled", "throttle": "1h", "cancel": True},
            {"name": "later", "on": "task.stalled", "to": ["c"]},
        ),
        clock=lambda: now[0],
    )
    stall = event("task.stalled", at=T0)
    dry = router.explain(stall)
    routed = router.route([stall])
    assert [d.target for m in dry for d in m.deliveries] == [d.target for d in routed]
    assert router.cancels(stall) == ["cancel"]
    now[0] += 60
    again = event("task.stalled", at=T0 + 60)  # the same task stalls again within the throttle
    [throttled] = [m for m in router.explain(again) if m.rule == "cancel"]
    assert throttled.matched
    assert throttled.throttled
    assert throttled.deliveries == ()
    assert [d.target for d in router.route([again])] == ["c"]
    assert router.cancels(again) == []  # no second cancel inside the throttle window


def test_a_rule_is_compiled_once_with_its_problems_and_their_paths() -> None:
    """compile_rule is the one parse of a rule: the loader maps these paths to FILE:LINE:COL,
    the router runs what compiled."""
    from bridge.rules import RuleIssue, compile_rule

    rule = RuleConfig.model_validate(
        {
            "name": "r",
            "on": ["task.complete", "task.failed"],
            "to": ["t", "nowhere"],
            "when": {"action": ["IMAGINE", "/(/"], "failreason": "x", "source": "mj"},
            "group": {"by": ["source", "bad..path"]},
            "title": "{{ task.prompt | trunc(5) }}",
        }
    )
    compiled, issues = compile_rule(rule, targets=["t"], sources=["midjourney"])
    assert [(i.path, i.key) for i in issues] == [
        (("on", 0), False),
        (("to", 1), False),
        (("when", "action", 1), False),
        (("when", "failreason"), True),
        (("when", "source", 0), False),
        (("group", "by", 1), False),
        (("title",), False),
    ]
    assert issues[0] == RuleIssue(
        ("on", 0), "unknown event type 'task.complete' (did you mean 'task.succeeded'?)"
    )
    assert issues[-1].message.endswith("(did you mean 'truncate'?)")
    # What compiled still runs: the source condition; the broken ones are left out.
    assert [c.path.key for c in compiled.conditions] == ["source"]
