"""docker-compose.yml read as compose reads it, its ${VAR:-default}s with nothing set: the
bridge's config passes `bridge check` in the bridge service's environment, and the three services'
addresses meet. `make docker-test` runs the file too (tests/test_docker.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bridge.config import WebhookTargetConfig, load_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def interpolated(value: str) -> str:
    """Compose's interpolation with an empty shell: every ${NAME:-default} is its default."""
    assert "${" not in DEFAULT.sub("", value), f"{value!r}: a variable without a default"
    return DEFAULT.sub(lambda m: m.group(2), value)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    found: dict[str, Any] = compose["services"]
    assert set(found) == {"bridge", "simulator", "receiver"}
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    """The variables the service sets (a bare NAME passes the shell's, unset here)."""
    pairs = (item.partition("=") for item in service.get("environment", []))
    return {name: interpolated(value) for name, sep, value in pairs if sep}


def rules_file(service: dict[str, Any]) -> Path:
    mounts = [v.split(":") for v in service["volumes"]]
    (host,) = [h for h, container, *_ in mounts if container == "/config/rules.yaml"]
    return REPO / host


def test_the_bridge_config_passes_bridge_check(services: dict[str, Any]) -> None:
    bridge = services["bridge"]
    env = environment(bridge)
    out = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "-c", str(rules_file(bridge))],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert ": ok (" in out.stdout


def test_the_services_addresses_meet(services: dict[str, Any]) -> None:
    bridge, receiver, simulator = services["bridge"], services["receiver"], services["simulator"]
    env = environment(bridge)
    config = load_config(rules_file(bridge), env)

    # The bridge polls the simulator's port, with the key the simulator wants (its default).
    sim_port = interpolated(simulator["command"][simulator["command"].index("--port") + 1])
    assert config.sources[0].base_url == f"http://127.0.0.1:{sim_port}"
    assert config.sources[0].api_key == "sim-key"

    # It delivers where the receiver listens, and the receiver verifies with the same secret.
    listen = environment(receiver)["BRIDGE_RECEIVE_LISTEN"]
    hooks = [t for t in config.targets.values() if isinstance(t, WebhookTargetConfig)]
    assert hooks
    assert all(urlsplit(t.webhook).netloc == listen for t in hooks)
    assert "PIPELINE_SECRET" in receiver["environment"]
    assert "PIPELINE_SECRET" in bridge["environment"]
    assert rules_file(receiver) == rules_file(bridge)

    # The server listens where the image's HEALTHCHECK looks, on loopback (no token needed).
    health = urlsplit(env["BRIDGE_HEALTHCHECK_URL"])
    assert str(config.server.listen) == health.netloc == env["MJ_LISTEN"]
    assert health.hostname == "127.0.0.1"

    # State on a named volume, and time to hand deliveries back on docker stop.
    assert any(v.endswith(":/data") and not v.startswith(".") for v in bridge["volumes"])
    assert bridge["stop_grace_period"] == "15s"
