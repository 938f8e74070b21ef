"""examples/: one config per upstream. Each passes `bridge check` with its environment set, names
the variables it cannot do without, and reads the simulator of its upstream with the auth and mode
it sets."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from bridge.cli import main
from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.simulator import Simulator
from bridge.sources.poll import TaskAPI
from bridge.sources.probe import choose_reader

# `bridge check` through main() sets up logging for the process: put it back after each test.
pytestmark = pytest.mark.usefixtures("restore_logging")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KEY = "sk-example-key-42"
ENV = {
    "MJ_API_KEY": KEY,
    "MJ_PUSH_TOKEN": "push-token-0123456789",
    "PIPELINE_SECRET": "whsec_c2VjcmV0LWZvci10aGUtZXhhbXBsZS1vbmx5",
    "BRIDGE_TOKEN": "status-token-0123456789",
}
# example -> (simulator flavour, auth, the mode the bridge reads in)
UPSTREAMS = {
    "midjourney-proxy": ("nz", "mj-api-secret", "active"),
    "midjourney-proxy-plus": ("midjourney-proxy", "mj-api-secret", "active"),
    "trueai": ("trueai", "raw", "list"),
    "new-api": ("new-api", "bearer", "ids"),
}


def test_one_example_per_upstream() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(UPSTREAMS)


@pytest.mark.parametrize("name", sorted(UPSTREAMS))
def test_bridge_check_accepts_the_example(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var, value in ENV.items():
        monkeypatch.setenv(var, value)
    for var in ("MJ_BASE_URL", "MJ_LISTEN", "PIPELINE_URL", "CHAT_URL", "BRIDGE_PUBLIC_URL"):
        monkeypatch.delenv(var, raising=False)
    assert main(["check", "-c", str(EXAMPLES / f"{name}.yaml")]) == 0
    assert ": ok (1 sources, 2 targets, 3 rules)" in capsys.readouterr().out
    config = load_config(EXAMPLES / f"{name}.yaml", dict(ENV))
    source = config.sources[0]
    assert source.auth == UPSTREAMS[name][1]
    # Container-friendly defaults: the upstream by its service name, every interface, with auth.
    assert "127.0.0.1" not in source.base_url
    assert config.server is not None
    assert str(config.server.listen) == ":8787"
    assert config.server.auth is not None


@pytest.mark.parametrize("name", sorted(UPSTREAMS))
def test_the_example_says_which_variable_is_missing(name: str) -> None:
    env = {k: v for k, v in ENV.items() if k != "BRIDGE_TOKEN"}
    with pytest.raises(ConfigError, match="environment variable BRIDGE_TOKEN is not set"):
        load_config(EXAMPLES / f"{name}.yaml", env)


@pytest.mark.parametrize("name", sorted(UPSTREAMS))
async def test_the_example_reads_its_upstream(name: str) -> None:
    flavor, _, mode = UPSTREAMS[name]
    async with Simulator(flavor, api_key=KEY) as sim, aiohttp.ClientSession() as session:
        sim.seed_tasks(5)
        config = load_config(EXAMPLES / f"{name}.yaml", {**ENV, "MJ_BASE_URL": sim.url})
        source = TaskAPI(config.sources[0], session)
        reader, _ = await choose_reader(config.sources[0], source)
        assert reader.mode == mode
        await reader.read([], set(), 0.0)
