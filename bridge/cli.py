"""The `bridge` command: argument parsing and exit codes only (0 ok, 1 runtime failure,
2 bad usage or invalid config). Each command's work lives in the module named after it (the
commands that act on a bridge from outside it: bridge/commands/)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge import __version__, logs
from bridge.errors import BridgeError, ConfigError
from bridge.explain import EventError

log = logging.getLogger("bridge")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments the parser cannot see (an unreadable file): exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridge",
        description=(
            "mj-bridge watches Midjourney task APIs (midjourney-proxy, its forks and relays), "
            "turns every task change into one event and routes events through rules.yaml to "
            "signed webhooks and to Slack, Discord, email and 100+ services through apprise."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mj-bridge {__version__}")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log lines as text or as one JSON object a line (default: text)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: the bridge's debug lines; -vv: the libraries' too (aiosqlite, asyncpg, aiohttp, "
        "apprise); default: info and up, libraries' warnings only",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            default=os.environ.get("BRIDGE_CONFIG", "rules.yaml"),
            help="the rules file (default: $BRIDGE_CONFIG or rules.yaml)",
        )

    def db_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--db",
            default=os.environ.get("BRIDGE_DB", "bridge.db"),
            help="the state database (default: $BRIDGE_DB or bridge.db)",
        )

    p = sub.add_parser(
        "run",
        help="the service: poll, diff, route, deliver, serve HTTP",
        description="Run the bridge until SIGINT/SIGTERM (clean stop); SIGHUP or an edit of the "
        "rules file reloads it after validating.",
    )
    config_arg(p)
    db_arg(p)

    p = sub.add_parser(
        "check",
        help="validate the config; print FILE:LINE:COL for every problem",
        description="Validate rules.yaml. Exit 0 when it is valid; otherwise print every problem "
        "as FILE:LINE:COL: message and exit 2.",
    )
    config_arg(p)

    p = sub.add_parser(
        "demo",
        help="zero-config tour: simulator, bridge and receiver in one process",
        description="Start the embedded upstream simulator, the bridge and a local webhook "
        "receiver, play a scripted set of tasks, print every event and delivery, exit 0.",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="give up after this many seconds (default: 60)"
    )

    p = sub.add_parser(
        "simulate",
        help="the upstream simulator alone, for trying rules against a realistic API",
        description="Serve a simulated Midjourney task API (midjourney-proxy, nz, trueai or "
        "new-api flavour) on 127.0.0.1 with tasks moving through realistic lifecycles.",
    )
    p.add_argument(
        "--port", type=int, default=8080, help="the port to serve on, on 127.0.0.1 (default: 8080)"
    )
    p.add_argument(
        "--flavor",
        default="midjourney-proxy",
        choices=["midjourney-proxy", "nz", "trueai", "new-api"],
        help="which upstream to imitate: its paths, auth header and task JSON "
        "(default: midjourney-proxy)",
    )
    p.add_argument(
        "--tasks", type=int, default=20, help="finished tasks to start with (default: 20)"
    )
    p.add_argument(
        "--api-key", default="sim-key", help="the key clients must send (default: sim-key)"
    )

    p = sub.add_parser(
        "receive",
        help="a sink for trying the rules: verifies and prints each webhook and chat delivery",
        description="Listen where the rules' webhook and apprise json:// targets point, verify "
        "each webhook's Standard Webhooks signature with its target's secret from the rules "
        "file, and print every event and chat message as it arrives. Stops on SIGINT/SIGTERM.",
    )
    config_arg(p)
    p.add_argument(
        "--listen",
        default=os.environ.get("BRIDGE_RECEIVE_LISTEN", "127.0.0.1:9000"),
        help="HOST:PORT to listen on (default: $BRIDGE_RECEIVE_LISTEN or 127.0.0.1:9000; "
        "':9000' for every interface, in a container)",
    )

    p = sub.add_parser(
        "explain",
        help="dry run: which rules match an event and what each target would get",
        description="Read an event (CloudEvents JSON as the webhook body carries it, or a stored "
        "one with --event ID) and show which rules match and the rendered title/body per target. "
        "Sends nothing.",
    )
    config_arg(p)
    db_arg(p)
    p.add_argument("event", nargs="?", help="path of the event JSON file, or - for standard input")
    p.add_argument(
        "--event",
        dest="event_id",
        metavar="ID",
        help="explain the stored event with this id (bridge events tail shows ids)",
    )

    p = sub.add_parser(
        "events",
        help="the events the bridge stored: the latest, new ones as they come, one in full",
        description="Read events out of the database, beside a running bridge.",
    )
    events = p.add_subparsers(dest="events_command", metavar="ACTION", required=True)
    tail = events.add_parser("tail", help="the latest events, oldest first; -f for new ones")
    db_arg(tail)
    tail.add_argument("-f", "--follow", action="store_true", help="then print new events as stored")
    tail.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="T",
        help="only this event type (task.succeeded; task.* for a family); repeatable",
    )
    tail.add_argument("--source", metavar="S", help="only events of this source")
    tail.add_argument("--task", metavar="ID", help="only events of this task")
    tail.add_argument(
        "-n",
        "--lines",
        type=int,
        default=20,
        metavar="N",
        help="how many to start with (default: 20)",
    )
    tail.add_argument(
        "--json", action="store_true", help="one CloudEvents JSON object a line (as webhooks get)"
    )
    show = events.add_parser("show", help="one event as CloudEvents JSON, with its deliveries")
    db_arg(show)
    show.add_argument("id", metavar="ID", help="the event id")

    p = sub.add_parser(
        "send-test",
        help="send one test notification to a target",
        description="Send one test notification to TARGET and report the outcome.",
    )
    config_arg(p)
    p.add_argument("target", help="the target's name under targets: in the rules file")

    p = sub.add_parser(
        "track",
        help="make a source follow task ids it cannot list (relays such as new-api)",
        description="Follow these task ids of SOURCE. Hands them to a running bridge through its "
        "POST /track endpoint when one answers; otherwise stores them in the database, where the "
        "bridge polling SOURCE finds them at its next poll.",
    )
    config_arg(p)
    db_arg(p)
    p.add_argument("source", help="the source's name in the rules file")
    p.add_argument("ids", nargs="+", metavar="ID", help="task ids to follow")

    p = sub.add_parser(
        "dlq",
        help="dead letters: list them or put them back in the outbox",
        description="Dead letters are deliveries that failed for good (max_attempts, max_age or a "
        "permanent error). List them, or replay them into the outbox.",
    )
    dlq = p.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    listing = dlq.add_parser("list", help="a table of dead letters, newest first")
    db_arg(listing)
    listing.add_argument("--target", metavar="T", help="only the dead letters of this target")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    replay = dlq.add_parser("replay", help="put dead letters back in the outbox")
    db_arg(replay)
    replay.add_argument(
        "ids", nargs="*", metavar="ID", help="dead letter ids, as bridge dlq list shows them"
    )
    replay.add_argument("--all", action="store_true", help="replay every dead letter")

    sub.add_parser(
        "hash-password",
        help="hash a password for server.auth.users",
        description="Reads a password (asked twice on a terminal, else one line of stdin) and "
        "prints its scrypt hash for server.auth.users in rules.yaml.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_format, args.verbose)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, EventError) as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BridgeError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def _read_json(path: str) -> Any:
    import orjson

    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        return orjson.loads(raw)
    except (OSError, orjson.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the event JSON: {exc}") from exc


def _why(exc: OSError) -> str:
    """An OSError as a few words (asyncio's bind error wraps them in a long sentence)."""
    match exc.errno:
        case errno.EADDRINUSE:
            return "address already in use"
        case errno.EACCES:
            return "permission denied"
    return exc.strerror or str(exc)


def _dispatch(args: argparse.Namespace) -> int:
    from bridge.config import load_config

    match args.command:
        case "check":
            from bridge.commands.check import verdict

            print(verdict(args.config, load_config(args.config)))
            return EXIT_OK
        case "run":
            from bridge.app import run_service

            config = load_config(args.config)
            asyncio.run(run_service(config, args.db, Path(args.config)))
            return EXIT_OK
        case "demo":
            from bridge.demo import demo

            return asyncio.run(demo(seconds=args.timeout))
        case "simulate":
            from bridge.simulator import serve

            try:
                with contextlib.suppress(KeyboardInterrupt):
                    asyncio.run(serve(args.port, args.flavor, args.tasks, args.api_key))
            except OSError as exc:
                print(
                    f"bridge: cannot listen on 127.0.0.1:{args.port}: {_why(exc)}", file=sys.stderr
                )
                return EXIT_FAILURE
            return EXIT_OK
        case "receive":
            from bridge.receive import receive

            rules = load_config(args.config) if Path(args.config).exists() else None
            try:
                return asyncio.run(receive(rules, args.listen, lambda s: print(s, flush=True)))
            except OSError as exc:
                print(f"bridge: cannot listen on {args.listen}: {_why(exc)}", file=sys.stderr)
                return EXIT_FAILURE
        case "explain":
            from bridge.explain import explain

            if (args.event is None) == (args.event_id is None):
                raise UsageError("explain needs an event file (or -) or --event ID, one of them")
            config = load_config(args.config)
            if args.event_id is not None:
                from bridge.commands.events import stored_event

                body = asyncio.run(stored_event(args.db, args.event_id))
                if body is None:
                    return EXIT_FAILURE
            else:
                body = _read_json(args.event)
            print(explain(config, body))
            return EXIT_OK
        case "events":
            from bridge.commands import events

            if args.events_command == "show":
                return asyncio.run(events.show_command(args.db, args.id))
            if args.lines < 0:
                raise UsageError("--lines must be 0 or more")
            return asyncio.run(
                events.tail_command(
                    args.db,
                    types=args.type,
                    source=args.source,
                    task=args.task,
                    count=args.lines,
                    follow=args.follow,
                    as_json=args.json,
                )
            )
        case "send-test":
            from bridge.commands.send_test import send_test_command

            config = load_config(args.config, sections=("targets",), only={"targets": args.target})
            return asyncio.run(send_test_command(config, args.target))
        case "track":
            from bridge.commands.track import track_command

            # Only what track needs: another target's unset ${SECRET} does not stop it.
            config = load_config(
                args.config, sections=("sources", "server"), only={"sources": args.source}
            )
            return asyncio.run(track_command(config, args.db, args.source, args.ids))
        case "hash-password":
            from bridge.commands.track import hash_password_command

            return hash_password_command()
        case "dlq":
            from bridge.commands import dlq

            if args.dlq_command == "list":
                return asyncio.run(dlq.list_command(args.db, args.target, args.json))
            return asyncio.run(dlq.replay_command(args.db, args.ids, args.all))
    return EXIT_USAGE
