"""`bridge explain`: which rules match a CloudEvents event and what each target would get."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import Config
from bridge.explain import explain, parse_event
from bridge.models import Event

CONFIG = Config.model_validate(
    {
        "targets": {
            "slack": "json://127.0.0.1:9/slack",
            "pipeline": {"webhook": "http://127.0.0.1:9/in"},
        },
        "rules": [
            {
                "name": "failures",
                "on": ["task.failed"],
                "when": {"action": ["IMAGINE", "BLEND"], "failReason": "/banned|invalid/i"},
                "to": ["slack"],
                "throttle": "1m",
            },
            {
                "name": "digest",
                "on": "task.*",
                "to": ["slack", "pipeline"],
                "group": {"wait": "30s"},
            },
            {"name": "done", "on": "task.succeeded", "to": ["pipeline"]},
        ],
    }
)


def body(type_: str = "task.failed", **task: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "evt_0123",
        "type": type_,
        "source": "bridge/mj",
        "subject": "1748340000000123",
        "time": "2026-11-28T13:44:14.123Z",
        "datacontenttype": "application/json",
        "data": {
            "task": {
                "id": "1748340000000123",
                "action": "IMAGINE",
                "status": "FAILURE",
                "prompt": "cat {{ 7*7 }} --ar 1:1:1",
                "failReason": "[Invalid parameter] Invalid aspect ratio",
                **task,
            },
            "previous": {"status": "IN_PROGRESS"},
        },
    }


def test_matching_rules_and_rendered_text() -> None:
    report = explain(CONFIG, body())
    assert report.splitlines()[0] == "event task.failed 1748340000000123 from mj (evt_0123)"
    assert "rule failures: matches" in report
    assert "note: throttle: at most one notification per task every 1m" in report
    assert "  -> slack\n     title: ❌ IMAGINE failed: cat {{ 7*7 }} --ar 1:1:1" in report
    assert "       Reason: [Invalid parameter] Invalid aspect ratio" in report
    # the digest rule matches too, but slack already gets the event from the first rule
    assert "note: slack: already gets this event from rule 'failures'" in report
    # a webhook gets the event itself, in the digest's batch here: no text is rendered for it
    assert (
        "  -> pipeline\n     receives the CloudEvent itself in the digest's JSON array "
        "(type task.failed, id evt_0123; no title or body)\n"
    ) in report
    assert "digest group 'digest|source=mj'" in report
    assert "rule done: no match: on [task.succeeded] does not include task.failed" in report
    assert report.endswith("2 target(s) would be notified; nothing was sent.")


def test_first_failing_condition_is_named() -> None:
    report = explain(CONFIG, body(action="UPSCALE"))
    assert "rule failures: no match: when action: has 'UPSCALE', wanted 'IMAGINE' or 'BLEND'" in (
        report
    )


def test_a_webhook_target_gets_the_event_not_text() -> None:
    config = Config.model_validate(
        {
            "targets": {
                "pipeline": {
                    "webhook": "http://127.0.0.1:9/in",
                    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                },
            },
            "rules": [{"name": "done", "on": "task.*", "to": "pipeline", "title": "x"}],
        }
    )
    report = explain(config, body("task.succeeded", status="SUCCESS"))
    assert report.splitlines()[2:5] == [
        "rule done: matches",
        "  -> pipeline",
        "     receives the CloudEvent itself as JSON (type task.succeeded, webhook-id evt_0123; "
        "signed, no title or body)",
    ]
    assert "title:" not in report


def test_round_trip_of_a_webhook_body() -> None:
    event = parse_event(body())
    assert Event.from_cloudevent(event.cloudevent()) == event
    assert event.source == "mj"


@pytest.mark.parametrize(
    ("payload", "phrase"),
    [
        ([], "JSON object"),
        ({"id": "1", "status": "SUCCESS"}, "bare task"),
        ({"specversion": "1.0"}, "no 'type'"),
        ({"type": "task.failed", "data": "x"}, "'data' must be an object"),
        ({"type": "task.failed", "time": "yesterday"}, "not a CloudEvents event"),
        ({"type": "task.nope"}, "'task.nope' is not a known event type"),
        ({"type": "task.faild"}, "(did you mean 'task.failed'?)"),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(payload: Any, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        explain(CONFIG, payload)
