"""The image as a user runs it: built from the repo's Dockerfile by `make docker-test`
(.ci/run runs it too), started the way docs/operations.md says with `--network host`, polling the
simulator and delivering to a receiver that both run on the host (this process).

Skipped unless BRIDGE_DOCKER_TEST=1 (set by `make docker-test`, which brings up the engine and
builds the image first), so a plain `make test` needs no Docker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook

from bridge.simulator import Simulator
from tests.receiver import Receiver, Reply

pytestmark = pytest.mark.skipif(
    os.environ.get("BRIDGE_DOCKER_TEST") != "1",
    reason="the container tests run under `make docker-test` (BRIDGE_DOCKER_TEST=1)",
)

IMAGE = os.environ.get("BRIDGE_DOCKER_IMAGE", "mj-bridge:test")
LABEL = "mj-bridge-test"  # .ci/docker-test removes whatever carries it, should a run die
REPO = Path(__file__).resolve().parent.parent

# The rules the container reads from /config: every address and secret comes from the
# environment (`docker run -e NAME`), as docs/operations.md tells users to pass them.
RULES = """\
sources:
  - name: mj
    base_url: ${MJ_BASE_URL}
    api_key: ${MJ_API_KEY}
    auth: mj-api-secret
    poll_interval: 200ms
targets:
  pipeline:
    webhook: ${PIPELINE_URL}
    secret: ${PIPELINE_SECRET}
rules:
  - name: everything
    on: "*"
    to: [pipeline]
server:
  listen: 127.0.0.1:%d
"""


class DockerError(AssertionError):
    pass


async def docker(*args: str, env: dict[str, str] | None = None, within: float = 120.0) -> str:
    """Run the docker CLI without blocking the loop (the simulator and receiver live in it);
    its stdout, or DockerError with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        "docker",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DockerError(f"docker {' '.join(args[:2])} took more than {within:.0f} s") from None
    if proc.returncode != 0:
        raise DockerError(f"docker {' '.join(args[:2])} exited {proc.returncode}: {err.decode()}")
    return out.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Deployment:
    """One simulator, one receiver, one rules file and one /data volume; containers of the image
    started against them one after another, as a user upgrading or restarting would."""

    sim: Simulator
    rx: Receiver
    rules: Path
    volume: str
    port: int
    api_key: str
    secret: str
    containers: list[str] = field(default_factory=list)

    @property
    def secrets(self) -> list[str]:
        return [self.api_key, self.secret, self.secret.removeprefix("whsec_")]

    async def start(self, *command: str) -> str:
        """`docker run` as docs/operations.md has it, with the host's network: secrets passed by
        name (`-e MJ_API_KEY`), so they are in neither the command line nor the file."""
        name = f"{self.volume}-{len(self.containers) + 1}"
        env = dict(
            os.environ,
            MJ_BASE_URL=self.sim.url,
            MJ_API_KEY=self.api_key,
            PIPELINE_URL=self.rx.url + "/events",
            PIPELINE_SECRET=self.secret,
        )
        await docker(
            "run", "-d", "--name", name, "--label", LABEL,
            "--network", "host", "--stop-timeout", "15",
            "-v", f"{self.volume}:/data",
            "-v", f"{self.rules}:/config/rules.yaml:ro",
            "-e", "MJ_BASE_URL", "-e", "MJ_API_KEY", "-e", "PIPELINE_URL", "-e", "PIPELINE_SECRET",
            "-e", f"BRIDGE_HEALTHCHECK_URL=http://127.0.0.1:{self.port}/healthz",
            IMAGE, *command,
            env=env,
        )  # fmt: skip
        self.containers.append(name)
        return name

    async def inspect(self, name: str, template: str) -> str:
        return (await docker("inspect", "-f", template, name)).strip()

    async def logs(self, name: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "docker", "logs", name, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        return out.decode(errors="replace")

    async def until(
        self, name: str, what: str, done: Callable[[], Any], within: float, tick: bool = True
    ) -> None:
        """Wait for `done()`, ticking the simulator unless told not to; on timeout fail with the
        container's log."""
        try:
            async with asyncio.timeout(within):
                while not await _value(done()):
                    if tick:
                        self.sim.tick()
                    await asyncio.sleep(0.2)
        except TimeoutError:
            log = await self.logs(name)
            pytest.fail(f"{what}: not within {within:.0f} s; the container's log:\n{log[-4000:]}")

    async def polled(self, name: str, times: int) -> None:
        """Wait until the simulator has answered `times` more requests (the container's polls)."""
        goal = len(self.sim.requests) + times
        await self.until(name, f"{times} polls", lambda: len(self.sim.requests) >= goal, 60)

    async def healthz(self, name: str) -> None:
        async def answers() -> bool:
            if await self.inspect(name, "{{.State.Running}}") != "true":
                pytest.fail(f"the container stopped; its log:\n{await self.logs(name)}")
            try:
                async with aiohttp.ClientSession() as s, s.get(self._url("/healthz")) as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await self.until(name, "/healthz answering 200", answers, 90)

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self) -> list[dict[str, Any]]:
        """Every delivery the receiver got, its signature verified with the secret that only
        the container's environment held."""
        verifier = Webhook(self.secret)
        return [verifier.verify(r.body, r.headers) for r in self.rx.requests]

    def has(self, task_id: str, type: str) -> Callable[[], bool]:
        return lambda: any(e["subject"] == task_id and e["type"] == type for e in self.events())

    async def stop(self, name: str) -> int:
        """`docker stop` (SIGTERM, then SIGKILL after the container's --stop-timeout 15): the
        exit code, 137 had Docker needed to kill it."""
        await docker("stop", name, within=60)
        return int(await self.inspect(name, "{{.State.ExitCode}}"))

    async def assert_no_secret_in_logs(self, name: str) -> None:
        log = await self.logs(name)
        shown = [s for s in self.secrets if s in log]
        assert not shown, f"the container's log shows a secret:\n{log}"


async def _value(x: Any) -> Any:
    return await x if asyncio.iscoroutine(x) else x


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    volume = "mj-bridge-test-" + secrets.token_hex(4)
    port = free_port()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES % port)
    rules.chmod(0o644)  # the container's user (uid 10001) reads it
    api_key = "key-" + secrets.token_hex(12)  # the simulator refuses any other
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    await docker("volume", "create", "--label", LABEL, volume)
    async with Simulator("midjourney-proxy", api_key=api_key) as sim, Receiver() as rx:
        d = Deployment(sim, rx, rules, volume, port, api_key, secret)
        try:
            yield d
            for name in d.containers:  # whatever the test did, no log may show a secret
                await d.assert_no_secret_in_logs(name)
        finally:
            for name in d.containers:
                await docker("rm", "-f", name)
            await docker("volume", "rm", "-f", volume)


async def test_the_image_runs_as_the_docs_say(deployment: Deployment) -> None:
    d = deployment
    name = await d.start()
    await d.healthz(name)  # on the port only the mounted /config/rules.yaml names

    # Non-root: the image's user, and the uid the bridge process (PID 1) really runs as.
    assert await d.inspect(name, "{{.Config.User}}") == "bridge"
    status = await docker("exec", name, "cat", "/proc/1/status")
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert uid == "10001"

    # The config is the mounted file, its ${VAR}s filled from the container's environment.
    checked = await docker("exec", name, "bridge", "check")
    assert checked.startswith("/config/rules.yaml: ok")

    await d.polled(name, 3)  # first contact made: what exists now is recorded, not reported
    ok = d.sim.add_task("a lighthouse at dusk", outcome="success", steps=2)
    bad = d.sim.add_task("a cat --ar 1:1:1", outcome="failure", steps=2)
    ends = (d.has(ok, "task.succeeded"), d.has(bad, "task.failed"))
    await d.until(name, "both tasks finishing", lambda: all(end() for end in ends), 60)

    got = d.events()  # each one's signature checked with the secret from the environment
    assert all(r.headers["webhook-id"] == e["id"] for r, e in zip(d.rx.requests, got, strict=True))
    assert [e["type"] for e in got if e["subject"] == ok][-1] == "task.succeeded"
    failed = next(e for e in got if e["subject"] == bad and e["type"] == "task.failed")
    assert failed["data"]["task"]["failReason"]

    # The image's own HEALTHCHECK (every 30 s) reaches healthy.
    await d.until(
        name,
        "the HEALTHCHECK reporting healthy",
        lambda: _healthy(d, name),
        120,
    )
    await d.assert_no_secret_in_logs(name)


async def _healthy(d: Deployment, name: str) -> bool:
    return await d.inspect(name, "{{.State.Health.Status}}") == "healthy"


async def test_state_on_the_volume_outlives_the_container(deployment: Deployment) -> None:
    d = deployment
    first = await d.start()
    await d.healthz(first)
    await d.polled(first, 3)
    done = d.sim.add_task("finished under the first container", outcome="success", steps=1)
    await d.until(first, "the first task finishing", d.has(done, "task.succeeded"), 60)
    running = d.sim.add_task("finishes while no container runs", outcome="success", steps=3)
    d.sim.tick(2)  # submitted, then running, with updates to go: it must not finish yet
    await d.until(first, "the second task starting", d.has(running, "task.started"), 60, tick=False)

    assert await d.stop(first) == 0
    await docker("rm", first)  # the container is gone; the volume stays
    d.sim.tick(10)  # the second task finishes in between

    second = await d.start()
    # Only the state on the volume tells the new container that this task was running: with a
    # fresh database, first contact would record it as it is and report nothing.
    await d.until(second, "the task that finished in between", d.has(running, "task.succeeded"), 90)
    later = d.sim.add_task("finished under the second container", outcome="success", steps=1)
    await d.until(second, "a new task", d.has(later, "task.succeeded"), 60)
    await d.polled(second, 5)

    got = d.events()
    ids = [e["id"] for e in got]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    finished = Counter(e["subject"] for e in got if e["type"] == "task.succeeded")
    assert finished == {done: 1, running: 1, later: 1}


async def test_docker_stop_hands_deliveries_back(deployment: Deployment) -> None:
    d = deployment
    d.rx.default = Reply(200, delay=60)  # the receiver holds every delivery: they are in flight
    first = await d.start("--verbose", "run")  # debug logging: the secrets check sees more lines
    await d.healthz(first)
    await d.polled(first, 3)
    task = d.sim.add_task("delivered by the next container", outcome="success", steps=1)
    await d.until(first, "a delivery in flight", lambda: len(d.rx.requests) >= 1, 60)
    in_flight = {r.headers["webhook-id"] for r in d.rx.requests}

    # Exit code 0, not 137: the bridge stopped by itself within --stop-timeout 15, as documented.
    assert await d.stop(first) == 0
    assert "back to the outbox" in await d.logs(first)

    d.rx.default = Reply(200)
    second = await d.start()
    await d.until(second, "the task's success", d.has(task, "task.succeeded"), 90)
    delivered = Counter(r.headers["webhook-id"] for r in d.rx.requests)
    assert all(delivered[i] >= 2 for i in in_flight), "an in-flight delivery was lost"
    assert "no dead letters" in await docker("exec", second, "bridge", "dlq", "list")


def compose_command() -> list[str] | None:
    """`docker compose` (the plugin) or Debian's `docker-compose` 1.29, whichever is here."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    found = shutil.which("docker-compose")
    return [found] if found else None


async def test_docker_compose_file_runs_the_tour() -> None:
    tool = compose_command()
    if tool is None:
        pytest.skip("no compose tool here (docker compose or docker-compose)")
    project = f"{LABEL}-{secrets.token_hex(4)}"
    ports = {"SIM_PORT": free_port(), "RECEIVER_PORT": free_port(), "BRIDGE_PORT": free_port()}
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    env = dict(os.environ, BRIDGE_IMAGE=IMAGE, PIPELINE_SECRET=secret)
    env.update({name: str(port) for name, port in ports.items()})
    file = str(REPO / "docker-compose.yml")

    async def compose(*args: str, within: float = 180.0) -> str:
        proc = await asyncio.create_subprocess_exec(
            *tool, "-f", file, "-p", project, *args,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        async with asyncio.timeout(within):
            out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise DockerError(f"{' '.join(tool)} {args[0]} exited {proc.returncode}:\n{text}")
        return text

    async def logs(service: str) -> str:
        return await compose("logs", "--no-color", service)

    try:
        await compose("up", "-d", "--no-build")
        bridge = (await compose("ps", "-q", "bridge")).strip()
        healthz = f"http://127.0.0.1:{ports['BRIDGE_PORT']}/healthz"

        async def delivered() -> bool:
            if await docker("inspect", "-f", "{{.State.Running}}", bridge) != "true\n":
                pytest.fail(f"the bridge stopped:\n{await logs('bridge')}")
            return "task.succeeded" in await logs("receiver")

        for _ in range(120):  # the simulator starts a task every 2 s
            if await delivered():
                break
            await asyncio.sleep(1)
        else:
            pytest.fail(f"no event reached the receiver:\n{await compose('logs', '--no-color')}")
        async with aiohttp.ClientSession() as s, s.get(healthz) as r:
            assert r.status == 200

        received = await logs("receiver")
        assert "(signature verified)" in received  # with the secret both got from the shell
        assert "refused" not in received
        await compose("stop", within=60)
        code = await docker("inspect", "-f", "{{.State.ExitCode}}", bridge)
        assert code.strip() == "0", await logs("bridge")
        everything = await compose("logs", "--no-color")
        assert secret not in everything
        assert secret.removeprefix("whsec_") not in everything
    finally:
        await compose("down", "-v", within=120)


async def test_a_code_change_reinstalls_no_dependency(tmp_path: Path) -> None:
    """A build after a code change takes the dependency stage from the cache (pip does not run
    again for them), and the bridge's own layer in the image is small."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy2(REPO / name, context / name)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "bridge", context / "bridge", ignore=skip)
    with (context / "bridge" / "__init__.py").open("a") as f:
        f.write(f"\n# a code change {secrets.token_hex(8)}\n")
    changed = IMAGE + "-code-change"
    out = await docker("build", "--network", "host", "-t", changed, str(context), within=1200)
    steps = out.split("\nStep ")  # the classic builder's output, one block per instruction
    # What this build made, the changed code stage included, goes again (vfs keeps full copies).
    made = [m[-1] for s in steps if "Using cache" not in s and (m := re.findall(r"---> (\w+)", s))]
    for image in [changed, *reversed(made)]:
        with contextlib.suppress(DockerError):
            await docker("rmi", image)
    (deps,) = [s for s in steps if "install -c constraints.txt -r requirements.txt" in s]
    assert "Using cache" in deps, f"the dependencies were installed again:\n{deps}"
    (code,) = [s for s in steps if "--no-deps --target" in s]
    assert "Using cache" not in code  # the changed code was installed

    history = ("history", "--no-trunc", "--human=false", "--format", "{{.Size}} {{.CreatedBy}}")
    layers = (await docker(*history, IMAGE)).splitlines()
    (lib,) = [line for line in layers if "python3.11/site-packages/" in line]
    assert int(lib.split()[0]) < 5_000_000, f"the code layer is not small: {lib}"
