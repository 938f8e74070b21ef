"""Broker targets in rules.yaml: told apart by their main key, URLs and name templates checked at
load time with FILE:LINE:COL, and a password in a broker URL never printed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.config import (
    AmqpTargetConfig,
    MqttTargetConfig,
    NatsTargetConfig,
    RedisTargetConfig,
    check,
    load_config,
)
from bridge.errors import Redactor
from bridge.templates import compile_template
from bridge.topics import Namer, clean, render, sample_event

pytestmark = pytest.mark.usefixtures("restore_logging")  # a test here calls main()

GOOD = """
targets:
  js: {nats: "nats://127.0.0.1:4222"}
  rabbit: {amqp: "amqp://guest:s3cret-pw@127.0.0.1:5672/", routing_key: "{{ type }}"}
  cache: {redis: "redis://127.0.0.1:6379/0", stream: "mj:{{ source }}", maxlen: 1000}
  things: {mqtt: "mqtt://127.0.0.1:1883", retain: true}
rules:
  - {name: all, to: [js, rabbit, cache, things]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def test_each_broker_is_told_apart_by_its_main_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), {})
    assert isinstance(config.targets["js"], NatsTargetConfig)
    assert isinstance(config.targets["rabbit"], AmqpTargetConfig)
    assert isinstance(config.targets["cache"], RedisTargetConfig)
    mqtt = config.targets["things"]
    assert isinstance(mqtt, MqttTargetConfig)
    # retain: true and no topic: one topic per task, holding its latest state
    assert mqtt.topic_template == "mj/{{ source }}/tasks/{{ subject }}"
    assert config.targets["js"].subject == "mj.{{ source }}.{{ type }}"
    assert "s3cret-pw" in config.secrets()


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ('{nats: "http://127.0.0.1:4222"}', "must start with nats:// or tls://"),
        ('{amqp: "amqp://guest:pw@:5672/"}', "has no host"),
        ('{redis: "redis://127.0.0.1:6379/zero"}', "has a database that is not a number"),
        ('{mqtt: "mqtt://u:pw@127.0.0.1:99999"}', "has an invalid port"),
        ('{nats: "nats://h:4222", subject: "mj.*.{{ type }}"}', "not a NATS subject"),
        ('{nats: "nats://h:4222", subject: "mj..x"}', "not a NATS subject"),
        ('{mqtt: "mqtt://h", topic: "mj/#"}', "not an MQTT topic"),
        ('{redis: "redis://h", stream: "{{ type"}', "template error"),
        ('{amqp: "amqp://h", routing_key: "{{ type | nosuchfilter }}"}', "template error"),
    ],
    ids=[
        "scheme",
        "host",
        "db",
        "port",
        "wildcard",
        "empty-token",
        "mqtt-wildcard",
        "syntax",
        "filter",
    ],
)
def test_bad_broker_settings_point_at_their_line(
    tmp_path: Path, target: str, expected: str
) -> None:
    path = write(tmp_path, f"targets:\n  t: {target}\nrules:\n  - {{name: r, to: t}}\n")
    problems = check(path, {})
    assert len(problems) == 1, problems
    assert problems[0].line == 2
    assert expected in problems[0].message, problems[0].message
    assert "pw" not in problems[0].message


def test_check_never_prints_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        'targets:\n  t: {amqp: "amqp://guest:hunter2-pw@127.0.0.1:99999/"}\n'
        "rules:\n  - {name: r, to: t}\n",
    )
    assert main(["check", "-c", str(path)]) == 2
    out = capsys.readouterr()
    assert "invalid port" in out.err
    assert "hunter2" not in out.out + out.err


def test_redactor_hides_broker_passwords() -> None:
    redact = Redactor(["tok3n-value"])
    text = redact("cannot reach amqp://guest:guest@h:5672/ or nats://tok3n-value@h:4222")
    assert "guest:guest" not in text
    assert "tok3n-value" not in text


@pytest.mark.parametrize(
    ("kind", "raw", "safe"),
    [
        ("nats", "mj.a b.task.*", "mj.a_b.task._"),
        ("nats", "mj..>", "mj._._"),
        ("mqtt", "mj/+/#", "mj/_/_"),
        ("amqp", "k" * 300, "k" * 255),
        ("redis", "mj:{x} y", "mj:{x} y"),
    ],
)
def test_a_task_id_never_widens_a_subscription(kind: str, raw: str, safe: str) -> None:
    assert clean(raw, kind) == safe  # type: ignore[arg-type]


def test_a_hostile_task_id_stays_inside_its_token() -> None:
    event = dataclasses.replace(sample_event(), subject="a.*>")
    name = render(compile_template("mj.{{ source }}.task.{{ subject }}"), event, "nats")
    assert name == "mj.mj.task.a.__"


def test_names_follow_each_event_whatever_the_template_uses() -> None:
    first = sample_event()
    other = dataclasses.replace(first, type="task.failed", task={"status": "FAILURE"})
    by_type = Namer("mj.{{ source }}.{{ type }}", "nats")
    assert [by_type(e) for e in (first, other, first)] == [
        "mj.mj.task.succeeded",
        "mj.mj.task.failed",
        "mj.mj.task.succeeded",
    ]
    by_status = Namer("mj/{{ task.status | lower }}", "mqtt")
    assert [by_status(e) for e in (first, other)] == ["mj/success", "mj/failure"]


def test_explain_shows_where_a_broker_would_put_the_event(tmp_path: Path) -> None:
    from bridge.explain import explain

    config = load_config(write(tmp_path, GOOD), {})
    event = sample_event()
    text = explain(config, {**event.cloudevent(), "source": "bridge/mj"})
    assert "on subject mj.mj.task.succeeded" in text
    assert "routing key task.succeeded" in text
    assert "in stream mj:mj" in text
    assert "on topic mj/mj/tasks/1234567890" in text
    assert "title:" not in text  # brokers get the event itself, no text is rendered
