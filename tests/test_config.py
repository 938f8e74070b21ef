"""Config loading: every problem at once, each pointing at its YAML node (line and column)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from bridge.config import (
    AppriseTargetConfig,
    ConfigError,
    WebhookTargetConfig,
    check,
    load_config,
    parse_duration,
    parse_rate,
)

GOOD = """\
sources:
  - name: mj
    base_url: ${MJ_BASE_URL}
    api_key: ${MJ_API_KEY}
    auth: bearer
    poll_interval: 5s
    backfill: false
    stall_after: 10m
    push_token: ${MJ_PUSH_TOKEN:-}

targets:
  team-slack: ${SLACK_URL}
  oncall-mail:
    url: mailtos://user:pass@smtp.example.com?to=oncall@example.com
  pipeline:
    webhook: https://pipeline.example.com/mj-events
    secret: ${PIPELINE_SECRET}
    headers: {X-Team: art}
    rate_limit: 30/min

rules:
  - name: failures
    on: [task.failed]
    when:
      action: [IMAGINE, BLEND]
      failReason: /banned|invalid/i
      properties.botType: MID_JOURNEY
    to: [team-slack, oncall-mail]
    title: "{{ task.action }} failed"
    body: "{{ task.prompt }}\\n{{ task.failReason }}"
    throttle: 1m
    stop: false
  - name: done
    on: [task.succeeded]
    to: [pipeline]

server:
  listen: 127.0.0.1:8787
"""

ENV = {
    "MJ_BASE_URL": "http://127.0.0.1:9",
    "MJ_API_KEY": "0123456789",
    "SLACK_URL": "slack://T000/B000/XXXXXXXX",
    "PIPELINE_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_spec_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), ENV)
    assert [s.name for s in config.sources] == ["mj"]
    assert config.sources[0].api_key == "0123456789"  # digits from ${VAR} stay text
    assert config.sources[0].poll_interval == 5.0
    assert config.sources[0].stall_after == 600.0
    assert isinstance(config.targets["team-slack"], AppriseTargetConfig)
    assert isinstance(config.targets["pipeline"], WebhookTargetConfig)
    assert config.targets["pipeline"].rate_limit == (30, 60.0)
    assert config.rules[0].on == ["task.failed"]
    assert config.rules[0].throttle == 60.0
    assert check(write(tmp_path, GOOD), ENV) == []


def test_yaml_12_booleans(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        targets:
          t: json://127.0.0.1:9/x
        rules:
          - name: r
            on: task.failed
            when: {state: yes, mode: off, seed: no}
            to: t
            stop: true
        """,
    )
    rule = load_config(path, {}).rules[0]
    assert rule.on == ["task.failed"]  # `on:` is a key, not True
    assert rule.when == {"state": "yes", "mode": "off", "seed": "no"}
    assert rule.stop is True


def test_env_defaults_and_empty(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - name: mj
            base_url: ${URL:-http://127.0.0.1:9}
            poll_interval: ${POLL:-250ms}
            backfill: ${BACKFILL:-true}
            timeout: ${TIMEOUT:-3}
        """,
    )
    source = load_config(path, {"POLL": ""}).sources[0]
    assert source.base_url == "http://127.0.0.1:9"
    assert source.poll_interval == 0.25  # set but empty takes the default, as in the shell
    assert source.backfill is True
    assert source.timeout == 3.0


# (file text, expected line, expected column, a phrase the message holds)
ERRORS = [
    pytest.param(
        "rules:\n  - name: r\n    to: t\n    tittle: x\ntargets: {t: 'json://127.0.0.1:9'}\n",
        4, 5, "unknown key 'tittle' (did you mean 'title'?)", id="unknown-key",
    ),
    pytest.param(
        "sources:\n  - name: mj\n    base_url: http://x\n    api_key: abc-${NOPE}\n",
        4, 18, "environment variable NOPE is not set", id="missing-env-var",
    ),
    pytest.param(
        "sources:\n  - name: mj\n    base_url: 'http://x'\n    api_key: \"${NOPE}\"\n",
        4, 15, "NOPE", id="missing-env-var-quoted",
    ),
    pytest.param(
        "sources:\n  - name: mj\n    base_url: http://x\n    poll_interval: 5 seconds\n",
        4, 20, "'5 seconds' is not a duration", id="bad-duration",
    ),
    pytest.param(
        "targets:\n  t:\n    webhook: https://x.example\n    rate_limit: lots\n",
        4, 17, "is not a rate", id="bad-rate",
    ),
    pytest.param(
        "sources:\n  - name: mj\n    base_url: http://a\n  - name: mj\n    base_url: http://b\n",
        4, 11, "duplicate name 'mj' (first at line 2; names must be unique)", id="duplicate-source",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - {name: a, to: t}\n  - {name: a, to: t}\n",
        4, 12, "duplicate name 'a'", id="duplicate-rule",
    ),
    pytest.param(
        "targets:\n  team-slack: json://127.0.0.1:9\nrules:\n  - name: r\n    to: [team-slak]\n",
        5, 10, "unknown target 'team-slak' (did you mean 'team-slack'?)", id="unknown-target",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    on: [task.done]\n    to: t\n",
        4, 10, "unknown event type 'task.done'", id="unknown-event-type",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    on: 'job.*'\n    to: t\n",
        4, 9, "'job.*' matches no event type", id="glob-matches-nothing",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    when:\n      failReason: /banned(/i\n",
        6, 19, "bad regex", id="bad-regex",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    when:\n      action: [IMAGINE, /x/g]\n",
        6, 25, "unknown regex flag 'g'", id="bad-regex-flag",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    when:\n      failreason: x\n",
        6, 7, "unknown task field 'failreason' (did you mean 'failReason'?)", id="bad-when-key",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    on: source.down\n    when: {action: IMAGINE}\n",
        6, 12, "source.* events carry none", id="task-key-on-source-event",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    title: '{{ task.action }'\n",
        5, 12, "template error", id="template-syntax",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    body: |\n      fine\n        {% for %}\n",
        7, 9, "template error", id="template-block-line",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    title: '{{ task.prompt | shout }}'\n",
        5, 12, "No filter named 'shout'", id="template-unknown-filter",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    body: \"{{ task.finishTime | localtime('Mars/Olympus') }}\"\n",
        5, 11, "unknown time zone 'Mars/Olympus'", id="template-bad-zone",
    ),
    pytest.param(
        "targets:\n  hook:\n    webhook: ftp://x.example/in\n", 3, 14, "http:// or https://",
        id="webhook-not-http",
    ),
    pytest.param(
        "targets:\n  chat: slackk://T000/B000/XXXX\n", 2, 9, "unknown apprise scheme 'slackk://'",
        id="apprise-unknown-scheme",
    ),
    pytest.param(
        "targets:\n  chat:\n    url: slack://onlyone\n", 3, 10, "apprise cannot use this slack://",
        id="apprise-unparseable",
    ),
    pytest.param(
        "targets:\n  h:\n    webhook: https://x.example\n    secret: whsec_%%%\n",
        4, 13, "not valid base64", id="bad-whsec",
    ),
    pytest.param(
        "sources:\n  - name: mj\n    base_url: ftp://x\n", 3, 15, "http:// or https://",
        id="source-url-not-http",
    ),
    pytest.param(
        "sources:\n  - name: MJ\n    base_url: http://x\n", 2, 11, "use lowercase letters",
        id="source-name-pattern",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    on: task.failed\n",
        3, 5, "missing required key 'to'", id="missing-key",
    ),
    pytest.param(
        "sources:\n  - name: mj\n    base_url: http://x\n    auth: basic\n", 4, 11, "'bearer'",
        id="bad-literal",
    ),
    pytest.param("server:\n  listen: nowhere\n", 2, 11, "HOST:PORT", id="bad-listen"),
    pytest.param("server:\n  listen: '::1:8787'\n", 2, 11, "[::]:8787", id="listen-bare-ipv6"),
    pytest.param("server:\n  listen: ':99999'\n", 2, 11, "HOST:PORT", id="listen-port-range"),
    pytest.param(
        "targets:\n  hook:\n    webhook: http://127.0.0.1:99999/x\n", 3, 14,
        "targets.hook.webhook: has an invalid port", id="webhook-port-range",
    ),
    pytest.param(
        "targets:\n  hook:\n    webhook: 'http://[::1/x'\n", 3, 14, "malformed [IPv6] host",
        id="webhook-bad-ipv6",
    ),
    pytest.param(
        "targets:\n  hook:\n    webhook: http://h:8o/x\n", 3, 14, "invalid port",
        id="webhook-port-not-a-number",
    ),
    pytest.param(
        "targets:\n  hook:\n    webhook: http://h/x\n    headers: {X-Key: \"a\\r\\nHost: evil\"}\n",
        4, 14, "header X-Key: its value holds a line break", id="webhook-header-line-break",
    ),
    pytest.param(
        "targets:\n  hook:\n    webhook: http://h/x\n    headers: {'X Key': a}\n", 4, 14,
        "header name 'X Key' is not a valid HTTP header name", id="webhook-header-name",
    ),
    pytest.param(
        "sources:\n  - name: mj\n    base_url: http://h:99999\n", 3, 15,
        "sources[0].base_url: has an invalid port", id="base-url-port-range",
    ),
    pytest.param(
        "targets:\n  art:\n    discord: https://discord.com/api/webhooks/1/tok\n"
        "    api_base: http://127.0.0.1:99999/api\n", 4, 15, "invalid port",
        id="discord-api-base-port",
    ),
    pytest.param(
        "targets:\n  team:\n    slack: '#mj'\n    token: xoxb-1\n"
        "    api_base: 'http://[::1/api'\n", 5, 15, "malformed [IPv6]", id="slack-api-base-ipv6",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    on: [task.failed]\n"
        "    to: t\n    cancel: true\n", 6, 13, "cancel only acts on task.stalled",
        id="cancel-without-stalled",
    ),
    pytest.param(
        "sources:\n  - {name: midjourney, base_url: 'http://x'}\n"
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    when: {source: midjurney}\n", 7, 20,
        "unknown source 'midjurney' (did you mean 'midjourney'?)", id="when-unknown-source",
    ),
    pytest.param(
        "sources:\n  - {name: mj, base_url: 'http://x'}\n"
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    when:\n      source: [mj, other]\n", 8, 20, "unknown source 'other' (sources: mj)",
        id="when-unknown-source-in-list",
    ),
    pytest.param(
        "targets: {t: 'json://127.0.0.1:9'}\nrules:\n  - name: r\n    to: t\n"
        "    when: {source: mj}\n", 5, 20, "unknown source 'mj' (no sources defined)",
        id="when-source-none-defined",
    ),
    pytest.param("rule: []\n", 1, 1, "unknown key 'rule' (did you mean 'rules'?)", id="top-key"),
    pytest.param("targets:\n  a: json://x\n  a: json://y\n", 3, 3, "duplicate key", id="dup-key"),
    pytest.param("rules:\n  - name: [\n", 3, 1, "invalid YAML", id="yaml-syntax"),
    pytest.param("- just\n- a list\n", 1, 1, "must be a mapping", id="not-a-mapping"),
    pytest.param(
        "targets:\n  t:\n    kind: email\n    url: x\n", 3, 5, "kind must be apprise or webhook",
        id="bad-kind",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "column", "phrase"), ERRORS)
def test_error_points_at_node(
    tmp_path: Path, text: str, line: int, column: int, phrase: str
) -> None:
    path = write(tmp_path, text)
    problems = check(path, {})
    assert problems, "expected a problem"
    first = problems[0]
    assert (first.line, first.column) == (line, column), [str(p) for p in problems]
    assert phrase in first.message
    assert str(first).startswith(f"{path}:{line}:{column}: ")


@pytest.mark.parametrize("listen", [":8787", "0.0.0.0:8787", "[::]:8787", "127.0.0.1:0"])
def test_listen_on_every_interface(tmp_path: Path, listen: str) -> None:
    text = f"server:\n  listen: '{listen}'\n  auth: {{token: a-long-enough-token}}\n"
    config = load_config(write(tmp_path, text), {})
    assert config.server is not None
    assert config.server.listen == listen


@pytest.mark.parametrize("listen", [":8787", "0.0.0.0:8787", "[::]:8787", "192.168.1.5:8787"])
def test_listening_beyond_loopback_without_auth_is_refused(tmp_path: Path, listen: str) -> None:
    path = write(tmp_path, f"server:\n  listen: '{listen}'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert f"{path}:2:11: server.listen: '{listen}' reaches beyond this machine" in str(
        caught.value
    )
    assert "insecure: true" in str(caught.value)
    # The operator may say so, and is told in the log at start (test_server_edge.py).
    insecure = load_config(write(tmp_path, f"server:\n  listen: '{listen}'\n  insecure: true\n"))
    assert insecure.server is not None
    assert insecure.server.insecure


@pytest.mark.parametrize(
    ("text", "at"),
    [
        ("retention: 1d\nserver:\n  max_connections: 10\n  header_timeout: 5s\n"
         "  listen: 0.0.0.0:8787\n", "5:11"),
        ("server: {max_connections: 10, listen: ':8787'}\n", "1:39"),
        ("server:\n  insecure: false\n  listen: ${MJ_LISTEN}\n", "3:11"),
    ],
    ids=["after-other-keys", "flow-mapping", "from-a-variable"],
)  # fmt: skip
def test_listening_beyond_loopback_without_auth_names_the_listen_key(
    tmp_path: Path, text: str, at: str
) -> None:
    """Not the `server:` mapping, nor its first key: the listen value the user wrote."""
    path = write(tmp_path, text)
    problems = check(path, {"MJ_LISTEN": "0.0.0.0:8787"})
    assert [f"{p.line}:{p.column}" for p in problems] == [at]
    assert problems[0].message.startswith("server.listen: ")
    assert "reaches beyond this machine" in problems[0].message
    if "MJ_LISTEN" in text:
        assert "0.0.0.0" not in problems[0].message  # a value from ${VAR} is named, not shown
        assert "${MJ_LISTEN}" in problems[0].message


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ("{}", "give a token, users, or both"),
        ("{token: short}", "at least 16 characters"),
        ("{users: {ann: plaintext}}", "not a password hash"),
    ],
    ids=["empty", "short-token", "plain-password"],
)
def test_server_auth_is_checked(tmp_path: Path, auth: str, message: str) -> None:
    path = write(tmp_path, f"server:\n  listen: ':8787'\n  auth: {auth}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert message in str(caught.value)
    assert "plaintext" not in str(caught.value)


def test_what_rules_may_name_and_cancel(tmp_path: Path) -> None:
    """The valid neighbours of the errors above: cancel where task.stalled can match, a `when`
    source that exists or a regex over source names, an IPv6 webhook with its port."""
    path = write(
        tmp_path,
        """\
        sources:
          - {name: mj, base_url: 'http://[::1]:8080'}
        targets:
          t: {webhook: 'http://[::1]:8080/in'}
        rules:
          - {name: a, on: 'task.*', to: t, cancel: true}
          - {name: b, on: [task.stalled], to: t, cancel: true, when: {source: mj}}
          - {name: c, to: t, when: {source: [/^m/, null]}}
        """,
    )
    config = load_config(path, {})
    assert [r.cancel for r in config.rules] == [True, True, False]


def test_every_problem_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - name: mj
            base_url: ${MJ_BASE_URL}
            poll_interval: soon
        targets:
          t: json://127.0.0.1:9
        rules:
          - name: r
            on: task.faild
            to: [t, u]
            when: {failReason: /(/}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    lines = [(p.line, p.column) for p in caught.value.problems]
    assert lines == [(3, 15), (4, 20), (9, 9), (10, 13), (11, 24)]
    assert str(caught.value).splitlines()[0].startswith(f"{path}:3:15: environment variable")


def test_missing_variable_is_the_only_problem_at_its_node(tmp_path: Path) -> None:
    path = write(tmp_path, "targets:\n  chat: ${SLACK_URL}\n")
    problems = check(path, {})
    assert [p.message.split(" is ")[0] for p in problems] == ["environment variable SLACK_URL"]


def test_secrets_never_echoed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - name: mj
            base_url: ftp://user:hunter2@x.example
            api_key: [hunter2-key]
        targets:
          a: slack://hunter2token
          b: {webhook: 'gopher://hunter2@x', secret: 'whsec_hunter2!'}
          c: {url: 'nope://hunter2'}
        """,
    )
    problems = check(path, {})
    assert len(problems) >= 5
    assert not any("hunter2" in str(p) for p in problems), [str(p) for p in problems]


def test_unreadable_file(tmp_path: Path) -> None:
    problems = check(tmp_path / "absent.yaml", {})
    assert [(p.line, p.column) for p in problems] == [(1, 1)]
    assert "cannot read the file" in problems[0].message


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), {})
    assert config.rules == []
    assert config.sources == []


def test_merge_keys_and_anchors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        targets: {t: 'json://127.0.0.1:9'}
        rules:
          - &base {name: a, on: task.failed, to: t, throttle: 1m}
          - <<: *base
            name: b
        """,
    )
    rules = load_config(path, {}).rules
    assert [(r.name, r.throttle) for r in rules] == [("a", 60.0), ("b", 60.0)]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (3, 3.0),
        ("5", 5.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-1s", "soon", "5 sec", True, -3])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "rate"), [("30/min", (30, 60.0)), ("5/s", (5, 1.0)), ("100 / hour", (100, 3600.0))]
)
def test_parse_rate(text: str, rate: tuple[int, float]) -> None:
    assert parse_rate(text) == rate


def test_the_documented_schema_loads(tmp_path: Path) -> None:
    """docs/rules.md's "The whole file" is a valid file naming every key, each with its default."""
    docs = Path(__file__).parent.parent / "docs" / "rules.md"
    block = docs.read_text().split("## The whole file")[1].split("```yaml\n")[1].split("```")[0]
    env = {
        "MJ_BASE_URL": "http://127.0.0.1:9",
        "MJ_API_KEY": "k",
        "MJ_PUSH_TOKEN": "t",
        "SLACK_URL": "json://127.0.0.1:9",
        "PIPELINE_SECRET": ENV["PIPELINE_SECRET"],
        "DISCORD_WEBHOOK": "https://discord.com/api/webhooks/1/abc",
        "SLACK_BOT_TOKEN": "xoxb-1",
        "BRIDGE_TOKEN": "an-operator-token-of-length",
        "CLIENT_TOKEN": "a-client-token-of-some-length",
    }
    config = load_config(write(tmp_path, block), env)
    documented = set(re.findall(r"^\s*(?:#\s*|-\s+)?([a-z_]+):", block, re.MULTILINE))
    for model in (
        type(config),
        type(config.sources[0]),
        *(type(t) for t in config.targets.values()),
        type(config.rules[0]),
    ):
        assert set(model.model_fields) - {"kind"} <= documented, model.__name__
