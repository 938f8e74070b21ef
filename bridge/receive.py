"""`bridge receive`: a sink to try the rules against, beside the pipeline. It stands where the
user's pipeline and chat would be: webhooks are checked against the Standard Webhooks signature of
the target that sent them and printed one line an event; apprise json:// notifications (chat) are
printed as their title. `bridge demo` uses the same sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from aiohttp import web

from bridge.config import AppriseTargetConfig, Config, WebhookTargetConfig
from bridge.targets.webhook import sign, signing_key

TOLERANCE = 300.0  # seconds a webhook-timestamp may be off, as the Standard Webhooks libraries
GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"


@dataclass(frozen=True, slots=True)
class Key:
    """One webhook target's signing key, and the path its URL posts to."""

    target: str
    path: str
    key: bytes


def _path(url: str) -> str:
    """A target URL's path as the server sees a request's (percent-decoded)."""
    return unquote(urlsplit(url).path) or "/"


def keys_of(config: Config) -> list[Key]:
    """The signing keys of the config's webhook targets (those without a secret sign nothing)."""
    out = []
    for name, target in config.targets.items():
        if isinstance(target, WebhookTargetConfig) and target.secret:
            out.append(Key(name, _path(target.webhook), signing_key(target.secret)))
    return out


def webhook_paths(config: Config) -> set[str]:
    """The paths of every webhook target of the config, with a secret or without."""
    return {_path(t.webhook) for t in config.targets.values() if isinstance(t, WebhookTargetConfig)}


def chat_paths(config: Config) -> dict[str, str]:
    """Path -> target name of the config's apprise json:// targets."""
    out = {}
    for name, target in config.targets.items():
        if isinstance(target, AppriseTargetConfig) and target.url.startswith(
            ("json://", "jsons://")
        ):
            out[_path(target.url)] = name
    return out


def verify(keys: Iterable[Key], path: str, headers: Any, body: bytes, now: float) -> str | None:
    """The name of the target whose key signed this request, or None. The timestamp must be
    within TOLERANCE of `now`."""
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    try:
        timestamp = int(stamp)
    except ValueError:
        return None
    if abs(now - timestamp) > TOLERANCE:
        return None
    given = [s for s in headers.get("webhook-signature", "").split() if s.startswith("v1,")]
    # The target posting to this path first, then any other (a proxy may rewrite paths).
    for key in sorted(keys, key=lambda k: k.path != path):
        expected = sign(key.key, msg_id, timestamp, body)
        if any(hmac.compare_digest(expected, g) for g in given):
            return key.target
    return None


def _printable(path: str) -> str:
    """A request's path as the terminal may show it: control characters (a caller's escape
    sequences) written out, not obeyed."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in path)


def _paint(text: str, colour: str) -> str:
    return f"{colour}{text}{RESET}" if sys.stdout.isatty() else text


@dataclass
class Sink:
    """The receiving end. `events` holds every verified event (CloudEvents JSON); `notes` every
    chat notification as (target, title, message). Only the targets' paths are served (the
    keys', `chats` and `webhooks`, the paths of webhook targets without a secret): any other is
    404 Not Found, whatever the request, so signatures are judged only where a target posts."""

    keys: list[Key]
    chats: dict[str, str] = field(default_factory=dict)
    show: Callable[[str], None] = print
    webhooks: set[str] = field(default_factory=set)
    events: list[dict[str, Any]] = field(default_factory=list)
    notes: list[tuple[str, str, str]] = field(default_factory=list)
    refused: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host or None, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown = "127.0.0.1" if bound_host in ("0.0.0.0", "::") else bound_host
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        if not self._serves(path):
            # Before the body is read or a header looked at: an unknown path says only this.
            line = f"  ✗ {request.method} {_printable(path)}: no target of the config posts here"
            self.show(_paint(line + " (404)", RED))
            return web.Response(status=404, text="not found\n")
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        body = await request.read()
        if "webhook-signature" in request.headers or path not in self.chats:
            return self._webhook(request, path, body)
        try:
            note = orjson.loads(body)
        except orjson.JSONDecodeError:
            note = {}
        if not isinstance(note, dict):
            note = {}
        title, message = str(note.get("title") or ""), str(note.get("message") or "")
        target = self.chats[path]
        self.notes.append((target, title, message))
        first = message.splitlines()[0] if message.strip() else ""
        self.show(_paint(f"  ✉ {target}: {title}" + (f" | {first}" if first else ""), DIM))
        return web.Response(text="ok")

    def _serves(self, path: str) -> bool:
        return path in self.chats or path in self.webhooks or any(k.path == path for k in self.keys)

    def _webhook(self, request: web.Request, path: str, body: bytes) -> web.Response:
        if not self.keys:
            self.refused += 1
            self.show(
                _paint(
                    f"  ✗ POST {_printable(path)}: no webhook target with a secret to verify", RED
                )
            )
            return web.Response(status=401, text="no key to verify this webhook with\n")
        target = verify(self.keys, path, request.headers, body, time.time())
        if target is None:
            self.refused += 1
            self.show(
                _paint(f"  ✗ POST {_printable(path)}: the signature does not verify; refused", RED)
            )
            return web.Response(status=401, text="signature does not verify\n")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return web.Response(status=400, text="not JSON\n")
        events = data if isinstance(data, list) else [data]
        for event in events:
            if not isinstance(event, dict):
                continue
            self.events.append(event)
            self.show(
                f"  {_paint('✓', GREEN)} {target}: {event.get('type', '?'):<15} "
                f"{event.get('source', '')} {event.get('subject', '')}  (signature verified)"
            )
        return web.Response(status=204)


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


async def receive(config: Config | None, listen: str, show: Callable[[str], None] = print) -> int:
    """Run the sink until SIGINT/SIGTERM."""
    sink = Sink(
        keys_of(config) if config else [],
        chat_paths(config) if config else {},
        show,
        webhook_paths(config) if config else set(),
    )
    host, port = _listen(listen)
    url = await sink.start(host, port)
    names = ", ".join(k.target for k in sink.keys) or "none: webhooks are refused"
    show(f"receiving on {url}; webhooks verified with the secrets of: {names}")
    for path, name in sink.chats.items():
        show(f"  chat {name} (apprise json://) at {url}{path}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sink.stop()
    show(f"received {len(sink.events)} verified events, {len(sink.notes)} chat messages")
    return 0
