"""Who holds a delivery claim or a lease: `host:pid:random`, one per open store. A claim or
lease whose holder is surely gone (this host, a process no longer running) is handed back at once
by the process that delivers (`Store.recover`); others run out on their own (`claimed_until`,
the lease's expiry). Opening a store never recovers anything.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Sequence

log = logging.getLogger("bridge.store")

#: Seconds a delivery claim outlives a process that stopped renewing it (renewed every third).
CLAIM_TIMEOUT = 30.0


#: The holders of the stores open in this process (a test may open several on one file).
_OPEN_HOLDERS: set[str] = set()


def new_holder() -> str:
    """Who this process is, in leases and claims: host, pid and a random tail (pids repeat)."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    _OPEN_HOLDERS.add(holder)
    return holder


def holder_gone(holder: str) -> bool:
    """True when `holder` (host:pid:tail) surely no longer runs: it names this host and a process
    that is not running, or this very process (pid 1 again after a container restart) but no
    store open here. Holders on other hosts are never judged: their claims and leases expire."""
    host, _, rest = holder.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return holder not in _OPEN_HOLDERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def log_recovered(count: int, gone: Sequence[str]) -> None:
    if count:
        whose = ", ".join(describe_holder(h) for h in gone) or "expired claims"
        log.warning(
            "%d deliveries claimed by a process that is gone (%s) go back to the outbox",
            count,
            whose,
        )


def describe_holder(holder: str) -> str:
    """A holder for people: "pid 123 on host web-1"."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    return f"pid {pid} on {host}" if pid.isdigit() else holder


def forget_holder(holder: str) -> None:
    """The store of `holder` closed: from now on it counts as gone."""
    _OPEN_HOLDERS.discard(holder)
