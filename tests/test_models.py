"""The shared nouns: status ranks, and an Event survives the trip through its CloudEvents JSON
(what `bridge explain` reads back)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bridge.errors import Redactor, redact
from bridge.models import Event, event_id, status_rank

NZ_SUCCESS = {
    "id": "1748339029401828",
    "properties": {"discordInstanceId": "1118138338562560102", "botType": "MID_JOURNEY"},
    "action": "IMAGINE",
    "status": "SUCCESS",
    "prompt": "dog playing ball --v 7",
    "progress": "100%",
    "failReason": None,
    "buttons": [{"customId": "MJ::JOB::upsample::1::x", "emoji": "", "label": "U1", "type": 2}],
}


@pytest.mark.parametrize(
    ("status", "rank"),
    [
        *[("NOT_START", 0), ("", 0), (None, 0), ("MODAL", 1), ("SUBMITTED", 2)],
        *[("IN_PROGRESS", 3), ("SUCCESS", 4), ("FAILURE", 4), ("CANCEL", 4), ("NEW", 0)],
    ],
    ids=str,
)
def test_status_ranks_follow_the_lifecycle(status: str | None, rank: int) -> None:
    assert status_rank(status) == rank


def test_event_survives_its_cloudevent() -> None:
    event = Event(
        id=event_id("mj", "1", "task.succeeded", "SUCCESS", "100%"),
        type="task.succeeded",
        source="mj",
        subject="1",
        time=datetime(2026, 11, 28, 13, 44, 14, 123000, tzinfo=UTC),
        task=NZ_SUCCESS,
        previous={"status": "IN_PROGRESS", "progress": "45%"},
    )
    body = event.cloudevent()
    assert body["source"] == "bridge/mj"
    assert body["time"] == "2026-11-28T13:44:14.123Z"
    assert body["data"]["task"] == NZ_SUCCESS
    assert Event.from_cloudevent(body) == event


def test_event_ids_are_deterministic_and_distinct() -> None:
    assert event_id("mj", "1", "task.progress", "45%") == event_id(
        "mj", "1", "task.progress", "45%"
    )
    assert event_id("mj", "1", "task.progress", "45%") != event_id(
        "mj", "1", "task.progress", "60%"
    )


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("mailtos://user:hunter2@smtp.example.com?to=a@b.c", "hunter2"),
        ("https://discord.com/api/webhooks/123/abcSECRETtoken", "abcSECRETtoken"),
        ("slack://T000/B000/XXXXsecretXXXX/#chan", "XXXXsecretXXXX"),
        ("http://x/hooks/mj?token=pushTOKEN1", "pushTOKEN1"),
        ("Authorization: Bearer sk-abcdef123", "sk-abcdef123"),
    ],
    ids=["userinfo", "discord", "slack", "query", "bearer"],
)
def test_redact_hides_credentials(text: str, hidden: str) -> None:
    assert hidden not in redact(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "mj (http://u:p@127.0.0.1:41080/?key=abc123) dead (3 polls)",
            "mj (http://***@127.0.0.1:41080/?key=***) dead (3 polls)",
        ),
        ("?token=t0k,next", "?token=***,next"),
        ("?secret=s3c; retry", "?secret=***; retry"),
        ("url='http://h/?apikey=k3y' bad", "url='http://h/?apikey=***' bad"),
        ('{"url": "http://h/?password=pw"}', '{"url": "http://h/?password=***"}'),
        ("?token=a&key=b#frag", "?token=***&key=***#frag"),
    ],
    ids=["parenthesis", "comma", "semicolon", "single-quote", "double-quote", "ampersand"],
)
def test_redacted_query_values_end_where_the_url_does(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redactor_hides_configured_values() -> None:
    assert "k3y-value" not in Redactor(["k3y-value"])("api key k3y-value rejected")
